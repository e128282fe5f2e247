"""The demo page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): it
shows the model name, streams a chat answer as it is written, stops a generation (which the server aborts), and
clears. A screenshot is saved as a test artifact (build/test-artifacts/serve_page.png, or $XVERSE_ARTIFACTS)."""
import os
import shutil
import tempfile
import time

import pytest

from serve_process import ROOT, ServerProcess, finished_count

webdriver = pytest.importorskip("selenium.webdriver", reason="the [test] extra installs selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Chromium is not installed (apt-get install chromium chromium-driver; "
                                       ".ci/run does this where apt works)")
ARTIFACTS = os.environ.get("XVERSE_ARTIFACTS", os.path.join(ROOT, "build", "test-artifacts"))


@pytest.fixture(scope="module")
def server():
    process = ServerProcess()
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="xverse-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_until(condition, timeout=60.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def set_value(driver, element_id, value):
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, value)


def last_answer(driver) -> str:
    answers = driver.find_elements("css selector", ".message.assistant .text")
    return answers[-1].text if answers else ""


def test_the_page_streams_stops_and_clears(server, browser):
    by_id = lambda name: browser.find_element("id", name)  # noqa: E731
    browser.get(server.url + "/")
    wait_until(lambda: by_id("model-name").text == "tiny-xverse-moe", what="the model name")
    assert by_id("status").text == "ready"
    # the sampling controls of the release demo, with the checkpoint's generation_config as defaults
    assert by_id("repetition_penalty").get_attribute("value") == "1.1"
    assert by_id("top_k").get_attribute("value") == "30" and by_id("top_p").get_attribute("value") == "0.85"
    assert not by_id("do_sample").is_selected()   # generation_config: do_sample false (greedy)

    # a chat turn: the answer streams in (it grows while the page says "generating"), then is done
    set_value(browser, "max_tokens", "120")
    by_id("prompt").send_keys("北京的景点有哪些？")
    by_id("send").click()
    lengths = []
    wait_until(lambda: lengths.append(len(last_answer(browser))) or
               browser.find_element("tag name", "body").get_attribute("data-state") == "idle", timeout=120,
               what="the end of the answer")
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 3, f"the answer did not stream in pieces (lengths seen: {growing})"
    assert last_answer(browser).strip()
    user_turns = browser.find_elements("css selector", ".message.user .text")
    assert [e.text for e in user_turns] == ["北京的景点有哪些？"]

    # text completion: the answer continues the prompt
    set_value(browser, "mode", "text")
    set_value(browser, "max_tokens", "40")
    prompt = "北京的景点：故宫、天坛、万里长城等。\n深圳的景点："
    browser.execute_script("document.getElementById('prompt').value = arguments[0]", prompt)
    by_id("send").click()
    wait_until(lambda: browser.find_element("tag name", "body").get_attribute("data-state") == "idle"
               and last_answer(browser).startswith(prompt) and len(last_answer(browser)) > len(prompt), timeout=120,
               what="the text completion")

    # a long generation, stopped: the page says so and the server aborts the request
    before = server.wait_idle()
    set_value(browser, "max_tokens", "1900")
    browser.execute_script("document.getElementById('prompt').value = arguments[0]", "The capital of France is")
    by_id("send").click()
    start = len("The capital of France is")
    wait_until(lambda: len(last_answer(browser)) > start + 20, timeout=60, what="streamed text")
    assert by_id("stop").is_enabled() and not by_id("send").is_enabled()
    os.makedirs(ARTIFACTS, exist_ok=True)
    by_id("stop").click()
    wait_until(lambda: browser.find_element("tag name", "body").get_attribute("data-state") == "idle",
               what="the stop")
    notes = browser.find_elements("css selector", ".message.assistant .note")
    assert notes[-1].text == "stopped"
    after = server.wait_idle(timeout=30)
    assert finished_count(after, "abort") - finished_count(before, "abort") == 1
    browser.save_screenshot(os.path.join(ARTIFACTS, "serve_page.png"))
    assert os.path.getsize(os.path.join(ARTIFACTS, "serve_page.png")) > 10_000

    by_id("clear").click()
    assert browser.find_elements("css selector", ".message") == []

"""The app's search box and feature links in a real headless Chromium: `qscope app --explanations FILE` on the demo.

A search finds features by the words of their explanation and picking one fills Steer's and Feature's boxes; a
feature id in Analyze opens that feature's card in the Feature tab. The explanations file is written by
``write_explanations`` with planted texts (no LLM runs here). Skipped when chromium / chromedriver are absent,
unless QSCOPE_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from qscope_plugin.models import DEMO_MODEL_DIR

REQUIRED = os.environ.get("QSCOPE_REQUIRE_BROWSER") == "1"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
START_TIMEOUT, ANSWER_TIMEOUT = 180, 60
why = None
if CHROMIUM is None or CHROMEDRIVER is None:
    why = "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
elif not DEMO_MODEL_DIR.is_dir():
    why = "the demo assets are not built"
else:
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            why = f"{module} is not installed"
if why is not None:
    if REQUIRED:
        raise RuntimeError(f"QSCOPE_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

EXPLAINED = {(3, 28): "Chinese characters in running text", (2, 7): "English function words such as 'the'",
             (3, 5): "punctuation at the end of Chinese sentences"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def explanations(tmp_path_factory):
    from qscope_plugin.recipes.explain import FeatureExplanation, Score, write_explanations

    rows = [FeatureExplanation("qscope-demo-qwen3-4l", layer, feature, text,
                               Score(0.9 - feature / 100, 0.8 - feature / 100, 0.95, 50, 50, 0.9, 0.9), None, 30, 40,
                               "planted", "planted") for (layer, feature), text in EXPLAINED.items()]
    return write_explanations(tmp_path_factory.mktemp("explain") / "demo.explanations.jsonl", rows)


@pytest.fixture(scope="module")
def app_url(explanations, tmp_path_factory):
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    proc = subprocess.Popen([sys.executable, "-m", "qscope_plugin.cli", "app", "--port", str(_free_port()),
                             "--explanations", str(explanations)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"`qscope app` printed no URL in {START_TIMEOUT} s: {''.join(seen)}")
            seen.append(line)
            if found := re.search(r"serving on (http://127\.0\.0\.1:\d+/?)", line):
                break
            if proc.poll() is not None and lines.empty():
                pytest.fail(f"`qscope app` exited with status {proc.returncode}: {''.join(seen)}")
        yield found[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _tab(driver, name: str) -> None:
    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()


def _value(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")


def test_search_by_explanation_fills_steer_and_feature(browser, app_url, tmp_path):
    browser.get(app_url)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.ID, "search-run"))
    box = browser.find_element(By.CSS_SELECTOR, "#search-text textarea, #search-text input")
    box.send_keys("chinese")
    box.send_keys(Keys.ENTER)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results input[type=radio]")) == 2)
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#search-results label")]
    assert "#5 " in labels[0] and "#28 " in labels[1], labels  # best detection score first (0.85, then 0.62)
    assert not any("#7 " in label for label in labels)
    browser.find_elements(By.CSS_SELECTOR, "#search-results label")[1].click()
    _tab(browser, "Steer")
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: _value(d, "#steer-feature input") == "28")
    assert _value(browser, "#steer-layer input") == "3"
    _tab(browser, "Feature")
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: _value(d, "#feature-id input") == "28")
    assert _value(browser, "#feature-layer input") == "3"
    browser.save_screenshot(str(tmp_path / "search.png"))
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_a_feature_id_in_analyze_opens_its_card(browser, app_url, tmp_path):
    browser.get(app_url)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.ID, "analyze-run"))
    browser.find_element(By.ID, "analyze-run").click()
    chips = "#analyze-out [data-feature]"
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, chips))
    chip = browser.find_elements(By.CSS_SELECTOR, chips)[0]
    feature = chip.get_attribute("data-feature")
    chip.click()
    WebDriverWait(browser, ANSWER_TIMEOUT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#feature-card [data-card='{feature}']"))
    card = browser.find_element(By.CSS_SELECTOR, "#feature-card [data-card]")
    assert f"Layer 3 · feature {feature}" in card.text
    browser.save_screenshot(str(tmp_path / "link.png"))

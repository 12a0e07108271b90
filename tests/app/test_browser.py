"""`qscope app` in a real headless Chromium: the command runs in a subprocess on the demo, the browser drives it.

One server and one browser for the module. The server's outgoing HTTP goes to a closed port (no internet, as on
CI). After every test: no SEVERE entry in the browser console, no request leaving 127.0.0.1 (the page must work
offline), no traceback or Gradio error toast on the page. The server reads a planted `qscope explain` file, so the
search box and the feature links are driven here too. Screenshots go to
the test's temporary folder. Skipped when chromium / chromedriver are absent, unless QSCOPE_REQUIRE_BROWSER=1
(CI), where their absence fails.
"""

from __future__ import annotations

import json
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
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1100")
START_TIMEOUT, ANSWER_TIMEOUT = 180, 60
pytestmark = pytest.mark.xdist_group("browser")  # one server and one browser for the module, in one process


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
    for module, extra in (("selenium", "dev"), ("gradio", "app")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'qscope-plugin[{extra}]')"
    if not DEMO_MODEL_DIR.is_dir():
        return "the demo assets are not built"
    return None


if (why := _missing()) is not None:
    if REQUIRED:
        raise RuntimeError(f"QSCOPE_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXPLAINED = {(3, 28): "Chinese characters in running text", (2, 7): "English function words such as 'the'",
             (3, 5): "punctuation at the end of Chinese sentences"}
"""Planted explanations for the search box (no LLM runs here); detection scores fall with the feature id."""


@pytest.fixture(scope="module")
def explanations(tmp_path_factory):
    """A `qscope explain` file of ``EXPLAINED``, written by ``write_explanations``."""
    from qscope_plugin.recipes.explain import FeatureExplanation, Score, write_explanations

    rows = [FeatureExplanation("qscope-demo-qwen3-4l", layer, feature, text,
                               Score(0.9 - feature / 100, 0.8 - feature / 100, 0.95, 50, 50, 0.9, 0.9), None, 30, 40,
                               "planted", "planted") for (layer, feature), text in EXPLAINED.items()]
    return write_explanations(tmp_path_factory.mktemp("explain") / "demo.explanations.jsonl", rows)


@pytest.fixture(scope="module")
def server(tmp_path_factory, explanations):
    """`qscope app --explanations FILE` on the demo, as a user runs it; its output lines go to a queue (the URL is
    one of them)."""
    no_internet = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                   "NO_PROXY": "127.0.0.1,localhost"}  # the server's own outgoing HTTP goes to a closed port
    env = {**os.environ, **no_internet, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    proc = subprocess.Popen([sys.executable, "-m", "qscope_plugin.cli", "app", "--port", str(_free_port()),
                             "--explanations", str(explanations)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    yield proc, lines
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """Started while the server loads: the two take turns on the CPUs instead of one after the other."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app_url(server) -> str:
    proc, lines = server
    seen = []
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"`qscope app` printed no URL in {START_TIMEOUT} s; it printed: {''.join(seen)}")
        seen.append(line)
        if found := re.search(r"serving on (http://127\.0\.0\.1:\d+/?)", line):
            return found[1]
        if proc.poll() is not None and lines.empty():
            pytest.fail(f"`qscope app` exited with status {proc.returncode}: {''.join(seen)}")


@pytest.fixture
def page(browser, app_url, tmp_path):
    """The app, freshly loaded; afterwards the checks every test shares."""
    browser.get(app_url)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.ID, "analyze-run"))
    yield browser
    browser.save_screenshot(str(tmp_path / "last.png"))
    _assert_clean(browser)


def _assert_clean(driver) -> None:
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"browser console errors: {severe}"
    outside = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.startswith(("http:", "https:", "ws:", "wss:")) and not re.match(r"\w+://127\.0\.0\.1[:/]", url):
                outside.add(url)
    assert not outside, f"the page fetched from outside this machine: {sorted(outside)}"
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in text and not driver.find_elements(By.CSS_SELECTOR, ".toast-body.error"), text[:2000]


def _tab(driver, name: str) -> None:
    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()


def _type(driver, css: str, text: str) -> None:
    """Replace a field's content the way a user does (select all, delete, type), so Gradio sees input events."""
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def _click_and_wait(driver, button_id: str, done) -> None:
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, ANSWER_TIMEOUT).until(done)


def _rows(driver, css: str) -> list[list[str]]:
    return [[cell.get_attribute("textContent") for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, f"{css} tbody tr")]


def _status(driver, prefix: str) -> str:
    """The message in a tab's status, or "" (Gradio's progress timer also shows there while a request runs)."""
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, f"#{prefix}-status .qs-error"))


def test_analyze_a_text(page, tmp_path):
    text = "This morning I drank a cup of hot tea."
    _type(page, "#analyze-text textarea", text)
    _type(page, "#analyze-layer input", "2")
    _click_and_wait(page, "analyze-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#analyze-out tbody tr"))
    rows = _rows(page, "#analyze-out")
    assert [int(r[0]) for r in rows] == list(range(len(rows))) and "".join(r[1] for r in rows) == text
    chips = page.find_elements(By.CSS_SELECTOR, "#analyze-out tbody tr:first-child [data-feature]")
    assert 1 <= len(chips) <= 5 and all(re.fullmatch(r"\d+: \d+\.\d\d", c.text) for c in chips)
    assert _status(page, "analyze") == ""
    page.save_screenshot(str(tmp_path / "analyze.png"))


def test_compare_two_texts(page, tmp_path):
    _tab(page, "Compare")
    _type(page, "#compare-a textarea", "我今天早上喝了一杯热茶。")
    _type(page, "#compare-b textarea", "This morning I drank a cup of hot tea.")
    _type(page, "#compare-top input", "3")
    assert page.find_element(By.CSS_SELECTOR, "#compare-first input").get_attribute("value") == "2"  # one middle layer
    _type(page, "#compare-first input", "0")
    _type(page, "#compare-last input", "3")
    page.find_element(By.CSS_SELECTOR, "#compare-common-tokens input").click()
    _click_and_wait(page, "compare-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#compare-out tbody tr"))
    rows = _rows(page, "#compare-out")
    assert [int(r[0]) for r in rows] == [layer for layer in range(4) for _ in range(3)]  # top 3 of layers 0..3
    for layer in range(4):
        scores = [abs(float(r[5])) for r in rows if int(r[0]) == layer]
        assert scores == sorted(scores, reverse=True)  # ranked by |A − B|
    assert all(float(r[5]) == pytest.approx(float(r[3]) - float(r[4]), abs=2e-3) for r in rows)
    page.save_screenshot(str(tmp_path / "compare.png"))

    # the Steer presets are now calibrated by this feature's difference r: Medium is 2·|r|
    layer, feature, r = rows[-1][0], rows[-1][2], abs(float(rows[-1][5]))
    _tab(page, "Steer")
    _type(page, "#steer-layer input", layer)
    _type(page, "#steer-feature input", feature)
    presets = page.find_element(By.ID, "steer-presets")
    WebDriverWait(page, ANSWER_TIMEOUT).until(lambda d: "r = " in presets.text)
    medium = float(re.search(r"Medium ([\d.e-]+)", presets.text)[1])
    assert medium == pytest.approx(2 * r, abs=2e-3)
    _type(page, "#steer-new-tokens input", "4")
    _click_and_wait(page, "steer-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#steer-unsteered tbody tr"))
    assert f"α = {medium:.4g}," in page.find_element(By.ID, "steer-steered").text


def test_steer_changes_the_output_and_shows_probabilities_and_candidates(page, tmp_path):
    _tab(page, "Steer")
    _type(page, "#steer-prompt textarea", "The weather today is")
    _type(page, "#steer-layer input", "3")
    _type(page, "#steer-feature input", "28")
    page.find_element(By.CSS_SELECTOR, "[data-testid='Strong-radio-label']").click()
    _type(page, "#steer-new-tokens input", "12")
    _click_and_wait(page, "steer-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#steer-unsteered tbody tr"))
    steered, unsteered = _rows(page, "#steer-steered"), _rows(page, "#steer-unsteered")
    assert [r[1] for r in steered] != [r[1] for r in unsteered]
    assert "α = 100" in page.find_element(By.ID, "steer-steered").text
    for rows in (steered, unsteered):
        assert 0 < len(rows) <= 12
        for _step, _token, prob, candidates in rows:
            assert 0 < float(prob) <= 1
            assert len(re.findall(r"\d\.\d{3}", candidates)) == 10  # the top-10 candidates, each with its p
    page.save_screenshot(str(tmp_path / "steer.png"))


def test_bad_input_shows_a_message_and_the_app_keeps_answering(page, tmp_path):
    _type(page, "#analyze-text textarea", "")
    _click_and_wait(page, "analyze-run", lambda d: _status(d, "analyze"))
    assert "no texts given" in _status(page, "analyze")
    assert not page.find_elements(By.CSS_SELECTOR, "#analyze-out tbody tr")
    page.save_screenshot(str(tmp_path / "empty-text.png"))
    _type(page, "#analyze-layer input", "9")
    _type(page, "#analyze-text textarea", "hello")
    _click_and_wait(page, "analyze-run", lambda d: "layer 9" in _status(d, "analyze"))
    assert "4 layers: 0..3" in _status(page, "analyze")
    _type(page, "#analyze-layer input", "1")
    _click_and_wait(page, "analyze-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#analyze-out tbody tr"))
    assert _status(page, "analyze") == "" and "".join(r[1] for r in _rows(page, "#analyze-out")) == "hello"

    _tab(page, "Steer")
    _type(page, "#steer-positions textarea", "7-3")
    _click_and_wait(page, "steer-run", lambda d: _status(d, "steer"))
    assert "positions '7-3' is a reversed range" in _status(page, "steer")


def _set_value(driver, css: str, text: str) -> None:
    """Put a long text in a field at once (typing 200,000 characters would take minutes) and tell Gradio."""
    field = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", field, text)


def test_a_hostile_request_is_refused_and_the_next_one_answered(page, tmp_path):
    """``0-999999999`` positions on a 200,000-character prompt once took the server down (23 GiB, then 13 minutes of
    generation); now the page says what was too large and the next, normal request is answered."""
    _tab(page, "Steer")
    _set_value(page, "#steer-prompt textarea", "今天早上" * 50_000)
    _type(page, "#steer-positions textarea", "0-999999999")
    _click_and_wait(page, "steer-run", lambda d: _status(d, "steer"))
    assert "the app takes at most 512 tokens per text" in _status(page, "steer")
    page.save_screenshot(str(tmp_path / "hostile.png"))
    _set_value(page, "#steer-prompt textarea", "今天早上")
    _click_and_wait(page, "steer-run", lambda d: "prompt position 999999999 is out of range" in _status(d, "steer"))
    _type(page, "#steer-positions textarea", "all")
    _type(page, "#steer-new-tokens input", "4")
    _click_and_wait(page, "steer-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#steer-unsteered tbody tr"))
    assert _status(page, "steer") == "" and len(_rows(page, "#steer-unsteered")) <= 4


def test_open_a_feature_card(page, tmp_path):
    _tab(page, "Feature")
    _type(page, "#feature-layer input", "3")
    _type(page, "#feature-id input", "28")
    _click_and_wait(page, "feature-run", lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-card [data-card]"))
    card = page.find_element(By.CSS_SELECTOR, "#feature-card [data-card]")
    assert card.get_attribute("data-card") == "28" and "Layer 3 · feature 28" in card.text
    assert re.search(r"density \d+\.\d+% \(\d+ of \d+ tokens\)", card.text)
    peaks = page.find_elements(By.CSS_SELECTOR, "#feature-card .qs-peak")
    assert peaks and all(float(p.get_attribute("data-act")) > 0 for p in peaks)
    assert page.find_elements(By.CSS_SELECTOR, "#feature-card svg.qs-hist rect")
    page.save_screenshot(str(tmp_path / "feature.png"))
    _type(page, "#feature-id input", "1536")
    _click_and_wait(page, "feature-run", lambda d: _status(d, "feature"))
    assert "1536 features: 0..1535" in _status(page, "feature")


def _value(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")


def test_search_by_explanation_fills_steer_and_feature(page, tmp_path):
    box = page.find_element(By.CSS_SELECTOR, "#search-text textarea, #search-text input")
    box.send_keys("chinese")
    box.send_keys(Keys.ENTER)
    WebDriverWait(page, ANSWER_TIMEOUT).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results input[type=radio]")) == 2)
    labels = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#search-results label")]
    assert "#5 " in labels[0] and "#28 " in labels[1], labels  # best detection score first (0.85, then 0.62)
    assert not any("#7 " in label for label in labels)
    page.find_elements(By.CSS_SELECTOR, "#search-results label")[1].click()
    _tab(page, "Steer")
    WebDriverWait(page, ANSWER_TIMEOUT).until(lambda d: _value(d, "#steer-feature input") == "28")
    assert _value(page, "#steer-layer input") == "3"
    _tab(page, "Feature")
    WebDriverWait(page, ANSWER_TIMEOUT).until(lambda d: _value(d, "#feature-id input") == "28")
    assert _value(page, "#feature-layer input") == "3"
    page.save_screenshot(str(tmp_path / "search.png"))


def test_a_feature_id_in_analyze_opens_its_card(page, tmp_path):
    page.find_element(By.ID, "analyze-run").click()
    chips = "#analyze-out [data-feature]"
    WebDriverWait(page, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, chips))
    chip = page.find_elements(By.CSS_SELECTOR, chips)[0]
    feature = chip.get_attribute("data-feature")
    chip.click()
    WebDriverWait(page, ANSWER_TIMEOUT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#feature-card [data-card='{feature}']"))
    card = page.find_element(By.CSS_SELECTOR, "#feature-card [data-card]")
    assert f"Layer 3 · feature {feature}" in card.text
    page.save_screenshot(str(tmp_path / "link.png"))


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> tuple[str, list[int]]:
    """A dashboard of the demo's layer-3 features written by ``write_dashboard``, and its features in order."""
    from qscope_plugin.app.dashboard import write_dashboard
    from qscope_plugin.demo.run import SENTENCES
    from qscope_plugin.models import load_model
    from qscope_plugin.recipes.inspection import feature_cards
    from qscope_plugin.store import DEMO_RELEASE, load_sae

    model, tok = load_model(str(DEMO_MODEL_DIR))
    cards = feature_cards(model, tok, SENTENCES["zh"] + SENTENCES["en"], load_sae(DEMO_RELEASE, 3), top=12, layer=3,
                          progress=False)
    path = write_dashboard(tmp_path_factory.mktemp("dashboard") / "dashboard.html", cards, title="demo layer 3")
    return path.as_uri(), [c.feature for c in cards]


def test_static_dashboard_from_disk_finds_a_feature(browser, dashboard, tmp_path):
    uri, features = dashboard
    browser.get(uri)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.ID, "feature-search"))

    def shown(css: str) -> list[str]:
        return [e.get_attribute("data-feature") or e.get_attribute("data-card")
                for e in browser.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]

    assert shown("#feature-list [data-feature]") == [str(f) for f in features]
    wanted = str(features[5])
    _type(browser, "#feature-search", wanted)
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: len(shown("#feature-list [data-feature]")) == 1)
    assert shown("#feature-list [data-feature]") == [wanted] and shown("[data-card]") == [wanted]
    browser.save_screenshot(str(tmp_path / "dashboard-search.png"))
    _type(browser, "#feature-search", "")
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: len(shown("#feature-list [data-feature]")) == len(features))
    _assert_clean(browser)


INK = """
const han = /[\\u3400-\\u9fff]/;
const tokens = [...document.querySelectorAll('.qs-token')].filter(e => han.test(e.textContent));
const chars = [...new Set(tokens.flatMap(e => [...e.textContent].filter(c => han.test(c))))];
const family = getComputedStyle(tokens[0]).fontFamily;
const ink = text => {
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 48;
  const context = canvas.getContext('2d');
  context.font = `32px ${family}`;
  context.fillText(text, 4, 38);
  return canvas.toDataURL();
};
return [chars.slice(0, 2), ink(chars[0]), ink(chars[1]), ink(String.fromCodePoint(0x10FFFD))];
"""
"""Draws two Chinese characters of the page's tokens, in the tokens' font, and a code point no font has (U+10FFFD,
drawn as the missing-glyph box): without a CJK font all three come out as the same box."""


def test_chinese_text_is_drawn_in_a_cjk_font(browser, dashboard):
    """The machine that runs the browser tests has a font for Chinese (.ci/run installs one): the Chinese tokens
    of the cards are drawn as their glyphs, not as boxes, so the screenshots show what a reader sees."""
    browser.get(dashboard[0])
    WebDriverWait(browser, ANSWER_TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".qs-token"))
    chars, first, second, missing = browser.execute_script(INK)
    assert len(chars) == 2, "the dashboard shows no Chinese tokens"
    assert first != missing and second != missing, f"{chars} are drawn as missing-glyph boxes: install a CJK font " \
                                                    "(Debian: apt-get install fonts-wqy-microhei)"
    assert first != second, f"{chars} are drawn alike"

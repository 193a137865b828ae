"""The playground page in a real headless browser (Debian's chromium + chromedriver, driven by selenium): models
chosen, a prompt and a two-turn chat sent to several models at once, answers streamed side by side and equal to
the server's own non-streamed answers, token counts from the usage chunk, an adapter loaded from the page.
Skipped where no browser is installed (`make test` installs one where apt can)."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
from bench.serve.load import serve
from lorakit.serve.engine import Limits, engine_from_spec

CHROME = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROME and DRIVER), reason="no chromium + chromedriver installed "
                                "(Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    for i, (name, r) in enumerate({"alpha": 2, "beta": 4, "gamma": 3}.items()):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(300 + i)
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False),
                  name)
        lk.save_adapter(model, folder / name, name)
    return folder


@pytest.fixture(scope="module")
def site(tiny_model_dir, root):
    limits = Limits(max_prompt_tokens=64, max_tokens=24, max_adapters=4)
    engine = engine_from_spec(str(tiny_model_dir), {"alpha": root / "alpha", "beta": root / "beta"}, name="tiny",
                              limits=limits)
    with serve(engine, root) as url:
        yield url
    engine.close()


@pytest.fixture(scope="module")
def browser():
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROME
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _answer(url, path, body):
    """The server's non-streamed answer (the reference the streamed page must match)."""
    out = httpx.post(f"{url}{path}", json={**body, "temperature": 0}, timeout=60).json()
    choice = out["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content")), out["usage"]


def _columns(driver):
    """Wait until every column finished its request; returns {model: (answer text, completion tokens)}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: all(c.get_attribute("data-state") in ("done", "error")
                             for c in d.find_elements(By.CSS_SELECTOR, ".column")))
    out = {}
    for col in driver.find_elements(By.CSS_SELECTOR, ".column"):
        assert col.get_attribute("data-state") == "done", col.text
        answers = col.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        stats = col.find_element(By.CSS_SELECTOR, ".stats")
        tokens = int(stats.get_attribute("data-completion-tokens"))
        assert "first token" in stats.text and " ms" in stats.text and "total" in stats.text, stats.text
        assert ("tok/s" in stats.text) == (tokens > 1), stats.text  # the decoding speed, after the first token
        out[col.get_attribute("data-model")] = (answers[-1].get_attribute("textContent"), tokens)
    return out


def _listed_models(driver):
    """The models the page lists, read in one script: the list is rebuilt after every load, so element
    handles taken in one call can be stale by the next."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#models input')].map((b) => b.dataset.model);")


def _type_and_send(driver, text):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_playground_prompts_and_chats_several_models_side_by_side(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = httpx.get(f"{site}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script src=\"/static/playground.js\">" in page.text and "http" not in page.text.split("<body>")[1]
    assert httpx.get(f"{site}/static/..%2Fapp.py").status_code == 404

    browser.get(f"{site}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input[type=checkbox]")) == 3)
    boxes = {b.get_attribute("data-model"): b for b in browser.find_elements(By.CSS_SELECTOR, "#models input")}
    assert list(boxes) == ["tiny", "alpha", "beta"] and boxes["tiny"].is_selected()
    boxes["alpha"].click()
    boxes["beta"].click()
    assert [c.get_attribute("data-model") for c in browser.find_elements(By.CSS_SELECTOR, ".column")] == \
        ["tiny", "alpha", "beta"]
    for field, value in (("max-tokens", "10"), ("temperature", "0")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)

    _type_and_send(browser, "hello there")
    got = _columns(browser)
    for model in ("tiny", "alpha", "beta"):
        text, usage = _answer(site, "/v1/completions", {"model": model, "prompt": "hello there", "max_tokens": 10})
        assert got[model] == (text, usage["completion_tokens"]), model
    assert len({text for text, _ in got.values()}) == 3  # three different models, three different answers

    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=chat]").find_element(By.XPATH, "..").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []  # switching modes starts afresh
    boxes["tiny"].click()  # the base model's column goes away
    history = {"alpha": [], "beta": []}
    for turn in ("hi", "and then?"):
        _type_and_send(browser, turn)
        got = _columns(browser)
        assert set(got) == {"alpha", "beta"}
        for model, messages in history.items():  # each column carries its own conversation
            messages.append({"role": "user", "content": turn})
            text, usage = _answer(site, "/v1/chat/completions", {"model": model, "messages": messages,
                                                                 "max_tokens": 10})
            assert got[model] == (text, usage["completion_tokens"]), (model, turn)
            messages.append({"role": "assistant", "content": text})


def test_playground_loads_an_adapter_and_shows_errors(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{site}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#models input"))
    browser.find_element(By.ID, "load-name").send_keys("gamma")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: "gamma" in _listed_models(d))
    assert browser.find_element(By.ID, "load-status").text == "gamma loaded"
    assert "gamma" in [m["id"] for m in httpx.get(f"{site}/v1/models").json()["data"]]
    browser.find_element(By.ID, "load-name").send_keys("../etc")
    browser.find_element(By.ID, "load").click()
    wait.until(lambda d: "403" in d.find_element(By.ID, "load-status").text)

    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("999")  # over the server's --max-tokens of 24
    _type_and_send(browser, "hi")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".column").get_attribute("data-state") == "error")
    assert "max_tokens" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text

"""The web page of `gpt2repro serve` in a real browser: Debian's headless chromium through
chromium-driver and selenium. A prompt typed into the page streams its reply in; a screenshot of each
page is written to the test's directory."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")

from gpt2repro.generation.generate import generate  # noqa: E402
from gpt2repro.serve.app import create_app  # noqa: E402
from gpt2repro.serve.run import ChatFormat, ServerThread, served_model  # noqa: E402

FLAGS = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
FLAGS += " --disable-component-update --disable-sync"


@pytest.fixture(scope="module")
def model(run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    return load_model(run_dir).eval()


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS.split(), f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800"]:
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    b.set_page_load_timeout(30)
    yield b
    b.quit()


def wait_for(browser, script: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda b: b.execute_script(script))


def test_the_page_streams_a_base_models_completion(browser, model, enc, tmp_path):
    from selenium.webdriver.common.by import By

    served = served_model(model, "test-model", 2)
    try:
        with ServerThread(create_app(served)) as s:
            browser.get(s.url + "/")
            assert wait_for(browser, "return document.body.dataset.ready") == "complete"
            assert browser.find_element(By.ID, "chat").is_displayed() is False
            browser.find_element(By.ID, "prompt").send_keys("ROMEO: what light")
            for name, value in (("max-tokens", "40"), ("temperature", "0")):
                field = browser.find_element(By.ID, name)
                field.clear()
                field.send_keys(value)
            browser.find_element(By.ID, "generate").click()
            assert wait_for(browser, "return $('output').dataset.state === 'done'")
            out = browser.find_element(By.ID, "output")
            text, chunks = out.get_attribute("textContent"), int(out.get_attribute("data-chunks"))
            browser.save_screenshot(str(tmp_path / "serve-completion.png"))
    finally:
        served.engine.stop()
    ids = torch.tensor([enc.encode("ROMEO: what light")])
    assert text == enc.decode(generate(model, ids, 40, temperature=0)[0, ids.size(1) :].tolist())
    assert chunks > 1  # streamed, piece by piece
    assert (tmp_path / "serve-completion.png").stat().st_size > 1000


def test_the_chat_page_streams_replies_keeps_the_system_prompt_and_resets(browser, model, enc, tmp_path):
    """A chat model's page, over a stand-in chat format (each message's text in turn) so the page is
    tested apart from any one template: the system prompt and the history reach the model."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    seen = []

    def render(messages):
        seen.append(messages)
        return enc.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    served = served_model(model, "chat-model", 2)
    served.chat = ChatFormat(render, enc.decode_single_token_bytes)
    try:
        with ServerThread(create_app(served, max_tokens_limit=24)) as s:
            browser.get(s.url + "/")
            assert wait_for(browser, "return document.body.dataset.ready") == "chat"
            browser.find_element(By.ID, "system").send_keys("Speak verse.")
            for turn, text in enumerate(("Good morrow", "And then?")):
                browser.find_element(By.ID, "message").send_keys(text, Keys.ENTER)
                script = f"const m = document.querySelectorAll('.assistant'); return m.length === {turn + 1} && m[{turn}].dataset.state === 'done'"
                assert wait_for(browser, script)
            replies = [
                e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")
            ]
            browser.save_screenshot(str(tmp_path / "serve-chat.png"))
            browser.find_element(By.ID, "reset").click()
            assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        served.engine.stop()
    assert all(replies) and seen[0] == [
        {"role": "system", "content": "Speak verse."},
        {"role": "user", "content": "Good morrow"},
    ]
    assert seen[1][2] == {"role": "assistant", "content": replies[0]} and seen[1][3]["content"] == "And then?"

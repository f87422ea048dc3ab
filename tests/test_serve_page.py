"""The web page of `gpt2repro serve` in a real browser: Debian's headless chromium through
chromium-driver and selenium. One browser and two servers of the tiny model (a base one and a chat
one over a stand-in chat format, each message's text in turn) serve every test; each test starts
from an empty localStorage. Every request the page sends is recorded, so the tests read what reached
the server. GPT2REPRO_SCREENSHOT=path writes the page's screenshot there (docs/webui.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from gpt2repro.generation.generate import generate  # noqa: E402
from gpt2repro.generation.sampling import GREEDY  # noqa: E402
from gpt2repro.serve.app import create_app  # noqa: E402
from gpt2repro.serve.protocol import APIError  # noqa: E402
from gpt2repro.serve.run import ChatFormat, ServerThread, served_model  # noqa: E402

FLAGS = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
FLAGS += " --disable-component-update --disable-sync"
FAIL = "<fail>"  # a message the chat server refuses (its chat format raises)
# what a hostile reply or message may hold: none of it may run
HOSTILE = (
    '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> [click](javascript:window.pwned=3) '
    '<a href="javascript:window.pwned=4">link</a> &lt;b&gt; &amp;'
)

# What the page's DOM must not hold after showing hostile text, whatever the CSP blocks: an element
# with an event handler attribute, one that loads or runs something, a javascript: or data: URL.
INERT = """
const root = arguments[0] || document.documentElement;
const all = [root, ...root.querySelectorAll('*')];
const url = /^\\s*(javascript|data|vbscript):/i;
return {
  handlers: all.filter((e) => [...e.attributes].some((a) => /^on/i.test(a.name))).map((e) => e.outerHTML.slice(0, 80)),
  elements: all.filter((e) => e.matches('img, script:not([src]), iframe, object, embed, svg, math, style, base, form:not([id])'))
    .map((e) => e.outerHTML.slice(0, 80)),
  urls: all.flatMap((e) => ['href', 'src', 'action', 'formaction'].map((a) => e.getAttribute(a) || '')).filter((u) => url.test(u)),
};
"""


def assert_inert(page, root=None) -> None:
    assert page.js(INERT, root) == {"handlers": [], "elements": [], "urls": []}
    assert page.js("return window.pwned") is None


class Recorder:
    """ASGI wrapper keeping the JSON body of every POST as (path, body) in `posts`."""

    def __init__(self, app):
        self.app, self.posts = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        messages = [await receive()]
        while messages[-1].get("more_body"):
            messages.append(await receive())
        self.posts.append((scope["path"], json.loads(b"".join(m.get("body", b"") for m in messages))))

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


@dataclass
class Server:
    url: str
    app: Recorder

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read().decode()

    def running(self) -> int:
        return json.loads(self.get("/health"))["running"]

    def metric(self, name: str) -> float:
        return float(re.search(rf"^{name} (\S+)$", self.get("/metrics"), re.M).group(1))

    def bodies(self, path: str = "/v1/chat/completions") -> list[dict]:
        return [body for p, body in self.app.posts if p == path]


@pytest.fixture(scope="module")
def model(run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    return load_model(run_dir).eval()


@contextmanager
def serving(model, model_id: str, chat: ChatFormat | None = None):
    served = served_model(model, model_id, 2)
    served.chat = chat
    app = Recorder(create_app(served))
    try:
        with ServerThread(app) as s:
            yield Server(s.url, app)
    finally:
        served.engine.stop()


@pytest.fixture(scope="module")
def base(model):
    with serving(model, "base-model") as server:
        yield server


@pytest.fixture(scope="module")
def chat(model, enc):
    def render(messages):
        if any(FAIL in m["content"] for m in messages):
            raise APIError(400, "the test server refuses this turn", "messages")
        return enc.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    with serving(model, "chat-model", ChatFormat(render, enc.decode_single_token_bytes)) as server:
        yield server


@contextmanager
def slowed(model, seconds: float = 0.02):
    """Every forward pass of the model takes `seconds` longer (a reply long enough to stop)."""
    hook = model.transformer.h[0].register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        hook.remove()


def until(condition, timeout: float = 30):
    """Wait until condition() is true (polling), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("profile")
    for flag in [*FLAGS.split(), f"--user-data-dir={profile}", "--window-size=1200,800"]:
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    b.set_page_load_timeout(30)
    yield b
    b.quit()


class Page:
    """The page in the browser, and the few things every test does with it."""

    def __init__(self, browser):
        self.b = browser

    def open(self, server: Server, **settings) -> Page:
        """The page of `server` with an empty localStorage but `settings` (greedy, Max tokens 8
        unless given; None: the page's default)."""
        self.b.get(server.url + "/")
        settings = {
            k: v for k, v in {"max_tokens": "8", "temperature": "0", **settings}.items() if v is not None
        }
        self.js(
            "localStorage.clear(); localStorage.setItem('gpt2repro.settings', arguments[0])",
            json.dumps(settings),
        )
        self.reload()
        return self

    def reload(self) -> None:
        self.b.refresh()
        self.wait("return document.body.dataset.ready")

    def js(self, script: str, *args):
        return self.b.execute_script(script, *args)

    def wait(self, script: str, *args, timeout: float = 30):
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(self.b, timeout, poll_frequency=0.05)
        return wait.until(lambda b: b.execute_script(script, *args))

    def find(self, css: str):
        return self.b.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str):
        return self.b.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> list[str]:
        return [e.get_attribute("textContent") for e in self.finds(css)]

    def send(self, *keys) -> None:
        """Type into the message box and press Enter; wait until the reply is in."""
        self.find("#message").send_keys(*keys, Keys.ENTER)
        self.idle()

    def idle(self) -> None:
        self.wait("return !document.body.classList.contains('busy')")

    def by_label(self, label: str):
        """The input a visible label names."""
        return self.b.find_element(
            By.XPATH, f"//label[normalize-space(text())='{label}']/*[self::input or self::textarea]"
        )

    def stub_copies(self) -> None:
        """The clipboard as window.copied (headless Chromium has none to read back)."""
        self.js("window.copied = null; navigator.clipboard.writeText = async (t) => { window.copied = t; };")

    def copied(self):
        return self.wait("return window.copied")

    def conversation(self) -> list[dict]:
        """The shown conversation's messages, as stored."""
        return self.js(
            "const all = JSON.parse(localStorage.getItem('gpt2repro.conversations') || '[]');"
            "const c = all.find((c) => c.id === localStorage.getItem('gpt2repro.current'));"
            "return c ? c.messages.map((m) => ({role: m.role, content: m.content})) : [];"
        )

    def import_file(self, path) -> None:
        self.find("#import").send_keys(str(path))


@pytest.fixture
def page(browser):
    return Page(browser)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_the_page_scripts_define_each_function_once():
    """No helper is copied from one script into another (el() was in markdown.js and app.js)."""
    from importlib import resources

    files = resources.files("gpt2repro.serve") / "static"
    defined: dict[str, list[str]] = {}
    for script in sorted(f.name for f in files.iterdir() if f.name.endswith(".js")):
        for name in re.findall(r"\bfunction\s+([\w$]+)\s*\(", (files / script).read_text()):
            defined.setdefault(name, []).append(script)
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}


def test_the_completion_box_streams_with_the_settings_statistics_and_a_length_cut(page, base, model, enc):
    """A base model's page: the reply is the model's own greedy continuation, streamed piece by piece;
    its statistics count the tokens the server generated; a reply cut by Max tokens says so."""
    page.open(base, max_tokens="40")
    assert page.js("return document.body.dataset.ready") == "complete"
    assert not page.find("#chat").is_displayed() and not page.find("#sidebar").is_displayed()
    before = base.metric("gpt2repro_generation_tokens_total")
    page.find("#prompt").send_keys("ROMEO: what light")
    page.find("#generate").click()
    assert page.wait("return $('output').dataset.state === 'done'")
    text, chunks = (
        page.find("#output").get_attribute("textContent"),
        int(page.find("#output").get_attribute("data-chunks")),
    )
    stats = page.find("#complete-stats .stats")
    ids = torch.tensor([enc.encode("ROMEO: what light")])
    assert text == enc.decode(generate(model, ids, 40, sampling=GREEDY)[0, ids.size(1) :].tolist())
    assert chunks > 1  # streamed, piece by piece
    assert (
        int(stats.get_attribute("data-tokens"))
        == 40
        == base.metric("gpt2repro_generation_tokens_total") - before
    )
    assert float(stats.get_attribute("data-ttft")) > 0 and float(stats.get_attribute("data-tps")) > 0
    assert stats.get_attribute("data-finish") == "length"
    assert "40 tokens" in stats.text and "cut at Max tokens (40)" in stats.text
    assert base.bodies("/v1/completions")[-1]["max_tokens"] == 40


def test_settings_have_labels_are_kept_across_reloads_and_sent_as_the_apis_parameters(page, chat):
    page.open(chat)
    page.find("#settings summary").click()
    values = {"System prompt": "Speak verse.", "Temperature": "0.5", "Top-k": "7", "Top-p": "0.9",
              "Max tokens": "12", "Seed": "1234"}  # fmt: skip
    for label, value in values.items():
        field = page.by_label(label)
        field.clear()
        field.send_keys(value)
    page.reload()
    page.find("#settings summary").click()
    assert {label: page.by_label(label).get_attribute("value") for label in values} == values
    page.send("Good morrow")
    body = chat.bodies()[-1]
    assert body["messages"] == [{"role": "system", "content": "Speak verse."}, user("Good morrow")]
    assert {k: body[k] for k in ("temperature", "top_k", "top_p", "max_tokens", "seed")} == {
        "temperature": 0.5, "top_k": 7, "top_p": 0.9, "max_tokens": 12, "seed": 1234}  # fmt: skip
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert page.finds("button[aria-label='Stop']")  # the Stop buttons are named


def test_max_tokens_defaults_to_256_within_the_contexts_room_and_a_full_context_says_so(page, chat, enc):
    """A reply can't fill the whole context: the default Max tokens is 256, asked for only as far as
    the context (256 tokens here) has room after the prompt; a reply cut there says so."""
    page.open(chat, max_tokens=None)
    page.find("#settings summary").click()
    assert page.by_label("Max tokens").get_attribute("value") == "256"
    text = " ".join(["apple"] * 245)
    page.js("$('message').value = arguments[0]", text)
    page.send(Keys.ENTER)
    room = 256 - len(enc.encode(f"user: {text}\n"))
    assert 0 < room < 16 and chat.bodies()[-1]["max_tokens"] == room
    stats = page.find(".msg.assistant .stats")
    assert stats.get_attribute("data-finish") == "length" and int(stats.get_attribute("data-tokens")) == room
    assert page.text(".msg.assistant .cut") == ["cut: the context is full"]


def test_enter_sends_shift_enter_breaks_the_line_and_each_reply_has_statistics(page, chat):
    page.open(chat)
    before = chat.metric("gpt2repro_generation_tokens_total")
    page.send("Good morrow", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "sir")
    page.send("And then?")
    replies = page.conversation()[1::2]
    first, second = chat.bodies()[-2:]
    assert first["messages"] == [user("Good morrow\nsir")]
    assert second["messages"] == [user("Good morrow\nsir"), replies[0], user("And then?")]
    assert page.find("#message").get_attribute("value") == ""
    stats = page.finds(".msg.assistant .stats")
    tokens = [int(s.get_attribute("data-tokens")) for s in stats]
    assert sum(tokens) == chat.metric("gpt2repro_generation_tokens_total") - before and all(tokens)
    assert all(float(s.get_attribute("data-ttft")) > 0 for s in stats)
    assert [s.text.startswith(f"{n} tokens · ") for s, n in zip(stats, tokens)] == [True, True]


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_stop_ends_the_generation_and_the_server_frees_its_sequence(page, chat, base, model, kind):
    """Stop (the chat's button; Esc on the base page) ends the reply at once: /health's running count
    and /metrics' running slots drop to 0 long before the 200 tokens asked for could be generated."""
    server = chat if kind == "chat" else base
    page.open(server, max_tokens="200")
    before = server.metric("gpt2repro_generation_tokens_total")
    with slowed(model):
        if kind == "chat":
            page.find("#message").send_keys("Tell me a long story", Keys.ENTER)
            streaming = ".msg.assistant[data-state='streaming'][data-chunks]"
        else:
            page.find("#prompt").send_keys("Once upon a time")
            page.find("#generate").click()
            streaming = "#output[data-state='streaming'][data-chunks]"
        page.wait(f'return document.querySelector("{streaming}")?.dataset.chunks >= 3')
        assert server.running() == 1
        if kind == "chat":
            page.find("#stop").click()
        else:
            page.find("body").send_keys(Keys.ESCAPE)
        until(lambda: server.running() == 0, timeout=3)  # 200 slowed tokens take over 4 s
        assert server.metric("gpt2repro_running_slots") == 0
        generated = server.metric("gpt2repro_generation_tokens_total") - before
        assert 0 < generated < 200
    page.idle()
    assert page.find("#send" if kind == "chat" else "#generate").is_displayed()
    if kind == "chat":  # the reply so far is kept, marked as stopped
        assert page.text(".msg.assistant .stats .cut") == ["stopped"] and len(page.conversation()) == 2
        stats = page.find(".msg.assistant .stats")
    else:
        assert page.find("#output").get_attribute("data-state") == "stopped"
        stats = page.find("#complete-stats .stats")
    # no usage chunk ends a stopped stream: its tokens are the pieces streamed, and say so
    tokens = int(stats.get_attribute("data-tokens"))
    assert 3 <= tokens <= generated and stats.get_attribute("data-approx") == "true"
    if kind == "base":
        assert tokens == int(page.find("#output").get_attribute("data-chunks"))
    assert stats.text.startswith(f"about {tokens} tokens · ") and float(stats.get_attribute("data-tps")) > 0


def test_a_failed_turn_rolls_back(page, chat):
    """A turn the server refuses leaves the conversation as it was (its text back in the message box),
    so the next turn is sent alone: today's page kept the failed user turn and sent two in a row."""
    page.open(chat)
    page.find("#message").send_keys(f"Hello {FAIL}", Keys.ENTER)
    assert "refuses this turn" in page.wait("return $('error').textContent")
    page.idle()
    assert page.finds(".msg") == [] and page.find("#message").get_attribute("value") == f"Hello {FAIL}"
    page.find("#message").clear()
    page.send("Hello")
    assert chat.bodies()[-1]["messages"] == [user("Hello")]
    assert [m["role"] for m in page.conversation()] == ["user", "assistant"]
    assert not page.find("#notice").is_displayed()


def test_a_full_storage_keeps_the_reply_and_says_it_was_not_saved(page, chat):
    """localStorage full (its quota): the reply stays on screen, and the page says the conversation
    could not be saved (the failed save rolled the reply back as if the server had failed)."""
    page.open(chat)
    page.js(
        "let i = 0; for (let size = 1 << 20; size >= 16; )"
        " try { localStorage.setItem('fill' + i++, 'x'.repeat(size)); } catch (e) { size >>= 1; }"
    )
    page.send("Hello")
    assert [m.get_attribute("class") for m in page.finds(".msg")] == ["msg user", "msg assistant"]
    assert page.text(".msg.assistant .body") != [""] and page.finds(".msg.assistant .stats")
    assert "could not be saved" in page.find("#error").text and "full" in page.find("#error").text
    assert page.find("#message").get_attribute("value") == ""  # not handed back as a failed turn
    page.js(
        "for (const key of Object.keys(localStorage)) if (key.startsWith('fill')) localStorage.removeItem(key)"
    )
    page.send("Again")  # with room again, the next turn saves the whole conversation
    assert [m["content"] for m in page.conversation()[::2]] == ["Hello", "Again"]
    assert not page.find("#notice").is_displayed()


def test_a_context_overflow_says_so_and_drops_the_oldest_turns(page, chat, enc):
    page.open(chat)
    turns = [" ".join([word] * 100) for word in ("apple", "pear", "plum")]
    assert all(len(enc.encode(t)) <= 101 for t in turns)  # three fill the context of 256, two leave room
    for text in turns:
        page.js("$('message').value = arguments[0]", text)
        page.send(Keys.ENTER)
    assert "no longer fits the model's context" in page.find("#error").text
    assert len(page.conversation()) == 4 and page.find("#message").get_attribute("value") == turns[2]
    sent = len(chat.bodies())
    page.find("#drop-oldest").click()
    page.idle()
    conversation = page.conversation()
    assert len(chat.bodies()) == sent + 1 and chat.bodies()[-1]["messages"] == conversation[:3]
    assert [m["content"] for m in conversation[::2]] == turns[1:]
    assert page.find("#message").get_attribute("value") == "" and not page.find("#notice").is_displayed()


MARKDOWN = """A *short* answer with **bold**, `inline code` and [a link](https://example.com/).

- first
- second

1. one
2. two

```python
print("hi")
```
"""


def test_replies_render_markdown_safely_with_copy_buttons(page, chat, tmp_path):
    """A reply (imported, as the model writes no markdown) renders its markdown as elements, and
    its HTML, javascript: links and entities as text; the code block's and the message's Copy
    buttons copy their text."""
    page.open(chat)
    reply = MARKDOWN + "\n" + HOSTILE
    saved = tmp_path / "md.json"
    saved.write_text(
        json.dumps(
            {"title": "Markdown", "messages": [user("Show me"), {"role": "assistant", "content": reply}]}
        )
    )
    page.import_file(saved)
    page.wait("return document.querySelector('.msg.assistant')")
    body = page.find(".msg.assistant .body")
    tags = page.js("return [...arguments[0].querySelectorAll('*')].map((e) => e.tagName.toLowerCase())", body)
    for tag in ("p", "em", "strong", "code", "a", "ul", "ol", "li", "pre"):
        assert tag in tags, tag
    assert_inert(page)
    assert [a.get_attribute("href") for a in page.finds("#log a")] == ["https://example.com/"]
    shown = body.get_attribute("textContent")
    assert '<img src=x onerror="window.pwned=1">' in shown and "<script>window.pwned=2</script>" in shown
    assert "[click](javascript:window.pwned=3)" in shown and "&lt;b&gt; &amp;" in shown
    assert page.text(".code pre code") == ['print("hi")'] and page.text(".code .lang") == ["python"]
    page.stub_copies()
    page.find(".code button[aria-label='Copy code']").click()
    assert page.copied() == 'print("hi")'
    page.stub_copies()
    page.find(".msg.assistant button[aria-label='Copy message']").click()
    assert page.copied() == reply
    assert_inert(page)


MARKDOWN_CASES = {
    "a\nb\n\nc": "<p>a<br>b</p><p>c</p>",
    "```js\nlet x = '<b>'": '<div class="code"><div class="code-head"><span class="lang">js</span>'
    '<button class="copy-code" type="button" aria-label="Copy code">Copy</button></div>'
    "<pre><code data-lang=\"js\">let x = '&lt;b&gt;'</code></pre></div>",  # unclosed: streaming
    "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
    "**bold *and em***": "<p><strong>bold <em>and em</em></strong></p>",
    "# Title\n> quoted\n\n---": "<h3>Title</h3><blockquote><p>quoted</p></blockquote><hr>",
    "3. three\n4. four\n   more": '<ol start="3"><li>three</li><li>four<br>more</li></ol>',
    "[x](data:text/html,hi) `<i>`": "<p>[x](data:text/html,hi) <code>&lt;i&gt;</code></p>",
    "## Sub ##\n#\tTab\n# a#\n#5": "<h4>Sub</h4><h3>Tab</h3><h3>a#</h3><p>#5</p>",
    "``a ` b`` `c` ```d``": "<p><code>a ` b</code> <code>c</code> ```d``</p>",
    "x * a *b*, a_b _c_ [d] [e](https://x.y/)": "<p>x * a <em>b</em>, a_b <em>c</em> [d] "
    '<a href="https://x.y/" target="_blank" rel="noopener noreferrer">e</a></p>',  # openers that fail
}


def test_markdown_edge_cases(page, chat):
    """markdown.js on its own: each source's elements, read back as HTML."""
    page.open(chat)
    script = "return arguments[0].map((t) => { const d = document.createElement('div'); d.append(Markdown.render(t)); return d.innerHTML; })"
    assert dict(zip(MARKDOWN_CASES, page.js(script, list(MARKDOWN_CASES)))) == MARKDOWN_CASES


# Long inputs of the shapes that make a backtracking regex slow (openers without closers, long runs
# of one delimiter, trailing spaces before a last character): each must render in linear time.
N = 10_000
PATHOLOGICAL = {
    "heading, spaces": "# a" + " " * N + "x",
    "heading, hashes": "# " + "#" * N + " x",
    "heading, spaced hashes": "# a" + " #" * (N // 2) + "x",
    "em openers": "*a " * (N // 3),
    "strong openers": "**a " * (N // 4),
    "underscore openers": "_a " * (N // 3),
    "strong underscore openers": "__a " * (N // 4),
    "strike openers": "~~a " * (N // 4),
    "asterisks": "*" * N + "a",
    "underscores": "a " + "_" * N,
    "code runs of every length": "".join("`" * k + "a" for k in range(1, 140)),
    "backticks": "`" * N + "a",
    "link brackets": "[" * N,
    "link openers": "[a](" * (N // 4),
    "link labels": "[a]" * (N // 3),
    "rule": "- " * (N // 2) + "x",
    "rule, spaces": "* *" + " " * N + "x",
    "item": "- " + " " * N + "x\u2028",
    "fence": "```" + " " * N + "x\n```" + " " * N + "x",
    "quotes": "> " * (N // 2) + "x",
    "quote marks": ">" * N,
    "list lines": "- a\n   b\n" * (N // 8),
    "nested emphasis": "**_" * (N // 6) + "a" + "_**" * (N // 6),
    "mixed": "*_~`[](#>-" * (N // 10),
}


def test_markdown_renders_pathological_input_in_linear_time(page, chat):
    """Every reply is rendered again on every streamed chunk, and a stored one on every reload: no
    input may make a regex backtrack its way into seconds (a heading with 3000 spaces took 7 s)."""
    page.open(chat)
    times = page.js(
        "return arguments[0].map((t) => { const d = document.createElement('div'); const t0 = performance.now();"
        " d.append(Markdown.render(t)); return performance.now() - t0; })",
        list(PATHOLOGICAL.values()),
    )
    slow = {name: round(ms) for name, ms in zip(PATHOLOGICAL, times) if ms > 200}
    assert slow == {}


def test_markdown_caps_quote_nesting_and_never_throws(page, chat):
    """A line of 5000 > is 8 nested quotes and the rest as text (it overflowed the stack); a renderer
    that fails anyway shows the raw text rather than throwing into the page."""
    page.open(chat)
    depth, shown = page.js(
        "const d = document.createElement('div'); d.append(Markdown.render('>'.repeat(5000) + ' deep'));"
        "let n = 0; for (let q = d.firstChild; q && q.tagName === 'BLOCKQUOTE'; q = q.firstChild) n++;"
        "return [n, d.textContent];"
    )
    assert depth == 8 and shown == ">" * (5000 - 8) + " deep"
    raw = page.js(
        "const create = document.createElement.bind(document);"
        "document.createElement = (tag) => { if (tag === 'h3') throw new Error('boom'); return create(tag); };"
        "try { const d = document.createElement('div'); d.append(Markdown.render('# Title\\n<b>x</b>'));"
        " return [d.children.length, d.textContent]; } finally { document.createElement = create; }"
    )
    assert raw == [1, "# Title\n<b>x</b>"]


def test_a_typed_hostile_message_shows_as_text_and_runs_nothing(page, chat):
    page.open(chat)
    page.send(HOSTILE)
    assert page.text(".msg.user .body") == [HOSTILE]
    assert page.text("#conversations button.open") == [HOSTILE[:40]]
    assert_inert(page)
    assert chat.bodies()[-1]["messages"] == [user(HOSTILE)]
    page.reload()  # and as stored
    assert page.text(".msg.user .body") == [HOSTILE]
    assert_inert(page)


# HTML in every form markdown.js builds: each form's text must go in as text, not markup (a form
# whose text went in through innerHTML, or a paragraph's through insertAdjacentHTML, makes elements)
MARKUP = """# <img src=x onerror="window.pwned=1"> heading
A paragraph <svg onload="window.pwned=2"></svg> with `<iframe src="javascript:window.pwned=3"></iframe>`,
**<b onclick="window.pwned=4">strong</b>**, *<i onmouseover="window.pwned=5">em</i>*, ~~<u>del</u>~~
- an item <script>window.pwned=6</script>
1. <object data="data:text/html,x"></object>

> a quote <embed src="javascript:window.pwned=7">

[<img src=y onerror="window.pwned=8">](https://example.com/) [x](javascript:window.pwned=9)
```<img/src=z/onerror=window.pwned=10>
<math><style>*{}</style></math>
```"""


def test_every_markdown_form_keeps_html_as_text(page, chat):
    page.open(chat)
    shown = page.js(
        "const d = $('log').appendChild(document.createElement('div')); d.className = 'probe';"
        "Markdown.render(arguments[0], d); return d.textContent;",
        MARKUP,
    )
    assert_inert(page)
    for piece in ('<img src=x onerror="window.pwned=1">', "<svg onload", "<iframe src=", "<b onclick",
                  "<i onmouseover", "<u>del</u>", "<script>", "<object data", "<embed src", "<img src=y",
                  "<img/src=z/onerror=window.pwned=10>", "<math><style>"):  # fmt: skip
        assert piece in shown, piece
    tags = page.js("return [...document.querySelectorAll('.probe *')].map((e) => e.tagName.toLowerCase())")
    assert {"h3", "p", "code", "strong", "em", "del", "ul", "ol", "li", "blockquote", "a", "pre"} <= set(tags)
    assert [a.get_attribute("href") for a in page.finds(".probe a")] == ["https://example.com/"]


def test_conversations_are_kept_in_the_browser_and_export_and_import(page, chat, tmp_path):
    page.open(chat)
    page.send("First chat")
    page.find("#new-chat").click()
    assert page.finds(".msg") == []
    page.send("Second chat")
    assert page.text("#conversations button.open") == ["Second chat", "First chat"]  # the latest first
    page.find("button[aria-label='Open conversation First chat']").click()
    assert page.text(".msg.user .body") == ["First chat"]
    page.js("window.prompt = () => 'Renamed'")
    page.find("button[aria-label='Rename conversation First chat']").click()
    page.reload()  # kept across reloads: the renamed one still shown
    assert page.text("#conversations button.open") == ["Renamed", "Second chat"]
    assert page.text(".msg.user .body") == ["First chat"] and page.find("li.current").text.startswith(
        "Renamed"
    )
    kept = page.js("return localStorage.getItem('gpt2repro.conversations')")

    page.b.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    page.find("#export").click()
    saved = tmp_path / "gpt2repro-conversations.json"
    until(lambda: saved.exists() and saved.stat().st_size)
    exported = json.loads(saved.read_text())
    assert [c["title"] for c in exported["conversations"]] == ["Renamed", "Second chat"]
    page.js("window.confirm = () => true")
    for title in ("Renamed", "Second chat"):
        page.find(f"button[aria-label='Delete conversation {title}']").click()
    assert page.finds("#conversations li") == [] and page.finds(".msg") == []
    page.import_file(saved)
    page.wait("return document.querySelectorAll('#conversations li').length === 2")
    assert json.loads(page.js("return localStorage.getItem('gpt2repro.conversations')")) == json.loads(kept)
    # nothing was stored on the server: the page only asked for token counts and replies
    assert {path for path, _ in chat.app.posts} <= {"/tokenize", "/v1/chat/completions"}


def reply(text: str, **stats) -> dict:
    return {"role": "assistant", "content": text, **({"stats": stats} if stats else {})}


def titles(page) -> list[str]:
    return page.text("#conversations button.open")


def test_a_hostile_import_or_tampered_storage_cannot_break_the_page(page, chat, tmp_path):
    """An imported file (or localStorage) is not trusted: fields of the wrong type are dropped, two
    conversations of one id become two ids (deleting one deleted both), and markdown bombs render in
    time; after a reload the page still loads, lists, switches and deletes."""
    page.open(chat)
    bombs = "\n".join(
        PATHOLOGICAL[k] for k in ("heading, spaces", "quote marks", "em openers", "link brackets")
    )
    hostile = [
        {"id": "same", "title": "One", "updated": 5, "messages": [user("one"), reply("first", ttft="1",
         tokens="7", tps={}, finish="<img>", context_full="yes", max_tokens=None)]},
        {"id": "same", "title": "Two", "updated": 4, "messages": [user("two"), reply("second", tokens=5,
         ttft=0.5, tps=12.5, finish="length", max_tokens=5, context_full=False)]},
        {"id": ["x"], "title": {"t": 1}, "updated": "soon", "messages": [
            user("untitled"), {"role": "system", "content": "dropped"}, {"role": "user", "content": 5},
            None, "text", reply("kept", tokens=-1)]},
        {"id": "bombs", "title": "Bombs", "updated": 3, "messages": [user(bombs), reply(bombs, tokens=[1])]},
        {"id": "deep", "title": "Deep", "updated": 2, "messages": [user("deep"), reply("d", ttft="NEST")],
         "extra": "NEST"},
        None, 5, "text", [], {"title": "No messages", "messages": "none"},
    ]  # fmt: skip
    nest = "[" * 5000 + "]" * 5000
    (tmp_path / "hostile.json").write_text(json.dumps(hostile).replace('"NEST"', nest))
    page.import_file(tmp_path / "hostile.json")
    page.wait("return document.querySelectorAll('#conversations li').length === 5")
    page.reload()
    assert titles(page) == ["One", "Two", "Bombs", "Deep", "New chat"]  # the latest first; no date: 0
    assert page.text(".msg .body") == ["one", "first"] and page.finds(".msg.assistant .stats") == []
    page.find("button[aria-label='Open conversation Two']").click()
    assert page.text(".msg .body") == ["two", "second"]
    assert page.text(".msg.assistant .stats") == [
        "5 tokens · 0.50 s to first token · 12.5 tokens/scut at Max tokens (5)"
    ]
    page.find("button[aria-label='Open conversation New chat']").click()
    assert page.text(".msg .body") == ["untitled", "kept"]
    page.find("button[aria-label='Open conversation Bombs']").click()
    assert len(page.finds(".msg.assistant blockquote")) == 8
    page.js("window.confirm = () => true")
    page.find("button[aria-label='Delete conversation One']").click()
    page.reload()
    assert titles(page) == ["Two", "Bombs", "Deep", "New chat"]
    page.find("button[aria-label='Open conversation Two']").click()
    assert page.text(".msg .body") == ["two", "second"]

    # the same from localStorage itself: two of one id, one without, junk
    stored = [
        {"id": "x", "title": "A", "updated": 3, "messages": [user("a")]},
        {"id": "x", "title": "B", "updated": 2, "messages": [user("b"), reply("b", ttft="1")]},
        {"title": "C", "updated": 1, "messages": [user("c")]},
        "junk",
        None,
        {"id": "y"},
    ]
    page.js(
        "localStorage.setItem('gpt2repro.conversations', arguments[0]);"
        "localStorage.setItem('gpt2repro.current', 'x');"
        'localStorage.setItem(\'gpt2repro.settings\', \'{"temperature": {"a": 1}, "seed": [1]}\')',
        json.dumps(stored),
    )
    page.reload()
    assert titles(page) == ["A", "B", "C"] and page.text(".msg .body") == ["a"]
    page.find("button[aria-label='Open conversation B']").click()
    assert page.text(".msg .body") == ["b", "b"]
    page.js("window.confirm = () => true")
    page.find("button[aria-label='Delete conversation B']").click()
    page.reload()
    assert titles(page) == ["A", "C"]
    page.js("window.confirm = () => true")
    page.find("button[aria-label='Open conversation C']").click()
    page.find("button[aria-label='Delete conversation C']").click()
    assert titles(page) == ["A"]
    page.find("#settings summary").click()
    assert page.by_label("Temperature").get_attribute("value") == "0.8"  # the default


def test_regenerate_the_last_reply_and_edit_a_user_message(page, chat):
    page.open(chat)
    page.send("One")
    page.send("Two")
    first = page.conversation()
    page.find(".msg.assistant:last-child button[aria-label='Regenerate reply']").click()
    page.idle()
    assert chat.bodies()[-1]["messages"] == first[:3] and len(page.conversation()) == 4
    assert page.finds("button[aria-label='Regenerate reply']") == page.finds(
        ".msg:last-child button[aria-label='Regenerate reply']"
    )
    page.find(".msg.user button[aria-label='Edit message']").click()
    field = page.find("textarea.edit")
    field.clear()
    field.send_keys("Uno", Keys.ENTER)
    page.idle()
    assert chat.bodies()[-1]["messages"] == [user("Uno")]  # the later turns dropped
    assert [m["content"] for m in page.conversation()][:1] == ["Uno"] and len(page.conversation()) == 2
    page.stub_copies()
    page.find(".msg.user button[aria-label='Copy message']").click()
    assert page.copied() == "Uno"


DEMO = """Here is how to sample from it:

1. Start the server with `gpt2repro serve`.
2. Send a **chat request**:

```python
r = client.chat.completions.create(model="demo", messages=[...])
```

*Stop* ends a reply at once; the sidebar keeps your conversations in this browser."""


def test_the_page_follows_the_color_scheme_and_fits_a_phone(page, chat, tmp_path):
    """Light and dark follow the system; at a phone's width nothing scrolls sideways and the sidebar
    slides in from its button. The screenshot (light, wide) goes to GPT2REPRO_SCREENSHOT if set."""
    page.open(chat, max_tokens="24")
    demo = {
        "title": "How do I use the API?",
        "messages": [user("How do I use the API?"), {"role": "assistant", "content": DEMO}],
    }
    (tmp_path / "demo.json").write_text(json.dumps(demo))
    page.import_file(tmp_path / "demo.json")
    page.wait("return document.querySelector('.msg.assistant')")
    page.send("Thanks! And a verse?")
    shot = os.environ.get("GPT2REPRO_SCREENSHOT") or str(tmp_path / "webui.png")
    page.b.save_screenshot(shot)
    assert os.path.getsize(shot) > 10_000

    background = "return getComputedStyle(document.body).backgroundColor"
    colors = {}
    for scheme in ("light", "dark"):
        page.b.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]}
        )
        colors[scheme] = page.js(background)
    page.b.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert colors == {"light": "rgb(255, 255, 255)", "dark": "rgb(13, 17, 23)"}

    metrics = {"width": 390, "height": 800, "deviceScaleFactor": 1, "mobile": True}
    page.b.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        assert page.wait("return innerWidth") == 390
        assert page.js("return document.documentElement.scrollWidth") <= 390
        message = page.js("return $('message').getBoundingClientRect().toJSON()")
        assert message["left"] >= 0 and message["right"] <= 390
        sidebar = "return $('sidebar').getBoundingClientRect()"
        assert page.wait(sidebar + ".right <= 0")  # out of sight (it slides)
        page.find("#menu").click()
        assert page.wait(sidebar + ".left >= 0")
        page.find("#conversations button.open").click()  # choosing a conversation hides it again
        assert page.wait(sidebar + ".right <= 0")
    finally:
        page.b.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

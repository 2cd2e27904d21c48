"""The web UI in headless Chromium, driven over the DevTools protocol against a live server:
a 10-turn conversation that outgrows the model's context (rolling context: no 400, the notice
appears), markdown with the calculator tool's call rendered and HTML in a reply shown as text, and
the stop button cancelling the generation on the server. Saves a screenshot of the conversation
(chat-ui.png in the test's tmp dir; with NANOPIPE_UPDATE_SCREENSHOT=1 also docs/img/chat-ui.png).

The model here is a test double that answers every prompt with one scripted token sequence (a tool
call included): the page, not the model, is under test."""
import asyncio
import base64
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
from helpers import REPO, make_cfg, require_module, require_tool
from script_double import ScriptModel
from serve_doubles import ASSISTANT_END, OUTPUT_END, PYTHON_END, PYTHON_START, ChatByteTokenizer, SlowModel, tiny_gpt
from serve_doubles import serve_in_thread as start
from serve_doubles import stop_server as stop

from nanopipe.serving.app import create_app

CONTEXT = 512  # a quarter (128 tokens) is kept for the reply: the scripted one (~115) is never cut
# what the double says: markdown, a calculator call (the engine forces its result in), and HTML that
# must be shown as text, never run
BEFORE = "Let me **add** them: "
AFTER = " so it is 5.\n```python\nprint(2 + 3)\n```\nAnd <img src=x onerror=\"window.pwned=1\"> stays text."


def script(tok):
    placeholder = [OUTPUT_END] * 3  # positions of the forced <|output_start|> 5 <|output_end|>: never sampled
    return (tok.encode(BEFORE) + [PYTHON_START] + tok.encode("2+3") + [PYTHON_END] + placeholder
            + tok.encode(AFTER) + [ASSISTANT_END])


def serve_cfg(**overrides):
    return make_cfg("experiment=smoke", *(f"serve.{k}={v}" for k, v in overrides.items())).serve


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class Page:
    """A Chromium tab over the DevTools protocol (a websocket; aiohttp's client)."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def send(self, method, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=180)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression):
        """The value of `expression` (awaited if a promise); a JS exception fails the test with its text."""
        r = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expression[:80]!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expression, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await self.js(expression):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    require_tool("chromium", "Debian: apt-get install -y chromium; .ci/run does", found=_chromium() is not None)
    require_module("aiohttp")
    profile = tmp_path_factory.mktemp("chromium")
    proc = subprocess.Popen([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--remote-debugging-port=0", "--window-size=900,1100", f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "HOME": str(profile)})
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError("chromium did not open its DevTools port")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    yield port
    os.killpg(proc.pid, 15)
    proc.wait(30)


def in_page(port, url, body):
    """Open `url` in the browser's tab and run `await body(page)`."""
    import aiohttp

    async def main():
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Page.navigate", url=url)
                await page.wait_for(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'"
                                    " && typeof sendMessage === 'function'")
                return await body(page)
    return asyncio.run(main())



def test_ten_turns_rolling_context_markdown_and_tool_call(browser, tmp_path):
    tok = ChatByteTokenizer()
    app = create_app(ScriptModel(script(tok), CONTEXT), tok, serve_cfg(max_batch=4))
    server, thread, url = start(app)

    async def conversation(page):
        turns = []
        for i in range(10):
            turns.append(await page.js(f"""(async () => {{
                chatInput.value = 'Question {i + 1}: what is 2 + 3?';
                await sendMessage();
                const err = chatWrapper.querySelector('.error-message');
                const notice = document.getElementById('contextNotice');
                return {{messages: messages.length, error: err && err.textContent,
                         notice: notice && notice.textContent,
                         dropped: chatWrapper.querySelectorAll('.message.dropped').length}};
            }})()"""))
        last = await page.js("""(() => {
            const b = chatWrapper.querySelectorAll('.message.assistant .message-content');
            const el = b[b.length - 1];
            const tool = el.querySelector('.tool-call');
            return {raw: el.dataset.raw, text: el.textContent, tool: tool && tool.textContent,
                    toolCode: tool && tool.querySelector('code').textContent,
                    icon: tool && tool.querySelector('svg[aria-label="calculator"]') !== null,
                    result: tool && tool.querySelector('.tool-result').textContent,
                    strong: el.querySelector('strong') && el.querySelector('strong').textContent,
                    pre: el.querySelector('pre code') && el.querySelector('pre code').textContent,
                    injected: chatWrapper.querySelectorAll('img, script').length, pwned: window.pwned === 1,
                    title: document.title, h1: document.querySelector('.header h1').textContent,
                    logoAlt: document.querySelector('.header img').alt,
                    about: document.querySelector('.about').textContent};
        })()""")
        await page.js("scrollToBottom()")
        shot = await page.send("Page.captureScreenshot", format="png")
        return turns, last, base64.b64decode(shot["data"])

    try:
        turns, last, png = in_page(browser, url + "/", conversation)
    finally:
        stop(server, thread)
    # every turn answered (no 400 however long the conversation got)
    assert [t["messages"] for t in turns] == [2 * (i + 1) for i in range(10)]
    assert all(t["error"] is None for t in turns), [t["error"] for t in turns]
    # the oldest turns were dropped, and the UI said so and dimmed them
    noticed = [t for t in turns if t["notice"]]
    assert noticed and turns[0]["notice"] is None
    n = noticed[-1]["dropped"]
    assert noticed[-1]["notice"] == f"{n} earlier messages no longer fit the model's {CONTEXT}-token context and were dropped"
    assert 0 < n < 20 and n % 2 == 0  # whole exchanges, and the newest kept
    # the reply rendered: the calculator call readable, markdown applied, HTML shown as text and never run
    assert last["raw"] == BEFORE + "🧮 `2+3` → 5" + AFTER
    assert (last["toolCode"], last["result"]) == ("2+3", "5") and last["tool"] == " 2+3 → 5" and last["icon"]
    assert last["strong"] == "add" and last["pre"] == "print(2 + 3)"
    assert '<img src=x onerror="window.pwned=1">' in last["text"] and last["injected"] == 0 and not last["pwned"]
    # nanopipe's own branding, nanochat credited
    assert (last["title"], last["h1"], last["logoAlt"]) == ("nanopipe", "nanopipe", "nanopipe logo")
    assert "nanochat" in last["about"] and "Karpathy" in last["about"]
    (tmp_path / "chat-ui.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    if os.environ.get("NANOPIPE_UPDATE_SCREENSHOT"):
        (REPO / "docs/img").mkdir(parents=True, exist_ok=True)
        (REPO / "docs/img/chat-ui.png").write_bytes(png)


def test_ten_turns_with_a_real_tiny_model(browser):
    """The same conversation against a real (random-weight) GPT with a 256-token context: every turn is
    answered, and once the turns outgrow the context the notice says how many messages were dropped."""
    app = create_app(tiny_gpt(sequence_len=256, seed=1), ChatByteTokenizer(), serve_cfg(max_batch=4))
    server, thread, url = start(app)

    async def conversation(page):
        out = []
        for i in range(10):
            out.append(await page.js(f"""(async () => {{
                chatInput.value = 'Turn {i + 1}: tell me about the weather today';
                await sendMessage();
                const err = chatWrapper.querySelector('.error-message');
                const notice = document.getElementById('contextNotice');
                const replies = chatWrapper.querySelectorAll('.message.assistant').length;
                return [messages.length, err && err.textContent, notice && notice.textContent, replies];
            }})()"""))
        return out

    try:
        turns = in_page(browser, url + "/", conversation)
    finally:
        stop(server, thread)
    assert all(t[1] is None for t in turns), [t for t in turns if t[1]]
    # every turn has its reply bubble; an empty reply (the model ended its turn at once) is shown as such
    # and left out of the conversation, which would otherwise be refused next turn (empty content)
    assert [t[3] for t in turns] == list(range(1, 11))
    counts = [t[0] for t in turns]
    assert all(b - a in (1, 2) for a, b in zip([0] + counts, counts))  # the user's message, and the reply if any
    notices = [t[2] for t in turns if t[2]]
    assert notices and all(n.endswith("earlier messages no longer fit the model's 256-token context and were dropped")
                           for n in notices)


def test_stop_button_cancels_the_generation_on_the_server(browser):
    app = create_app(SlowModel(delay=0.05), ChatByteTokenizer(), serve_cfg(max_batch=4, max_tokens=4096))
    server, thread, url = start(app)
    stats = lambda: httpx.get(f"{url}/stats").json()  # noqa: E731

    async def stop_mid_reply(page):
        await page.js("chatInput.value = 'go on forever'; window.done = sendMessage().then(() => true); 0")
        await page.wait_for("(chatWrapper.querySelector('.message.assistant .message-content').dataset.raw || '')"
                            ".length >= 5")  # tokens are streaming
        assert stats()["active"] == 1
        visible = await page.js("[getComputedStyle(stopButton).display, getComputedStyle(sendButton).display]")
        assert visible == ["flex", "none"]  # the send button became the stop button
        await page.js("stopButton.click(); window.done")
        return await page.js("""(() => {
            const el = chatWrapper.querySelector('.message.assistant .message-content');
            return {messages: messages.length, raw: el.dataset.raw, label: el.querySelector('.stopped-label').textContent,
                    generating: isGenerating, send: getComputedStyle(sendButton).display};
        })()""")

    try:
        before = stats()["workers"][0]["requests_cancelled"]
        page = in_page(browser, url + "/", stop_mid_reply)
        deadline = time.time() + 20
        while time.time() < deadline and (stats()["active"] or stats()["workers"][0]["requests_cancelled"] == before):
            time.sleep(0.05)
        after = stats()
    finally:
        stop(server, thread)
    # the server cancelled the request when the page aborted its fetch: the slot is free
    assert after["active"] == 0 and after["workers"][0]["requests_cancelled"] == before + 1
    # the partial reply stays in the conversation, marked; the page is ready for the next message
    assert page["messages"] == 2 and len(page["raw"]) >= 5 and page["label"] == "(stopped)"
    assert not page["generating"] and page["send"] == "flex"


def test_an_empty_reply_does_not_break_the_conversation(browser):
    """A model that ends its turn at once: the bubble says so, and the next messages are still answered
    (an empty assistant message sent back would be refused: 'Message 1 has empty content')."""
    app = create_app(ScriptModel([ASSISTANT_END], CONTEXT), ChatByteTokenizer(), serve_cfg(max_batch=4))
    server, thread, url = start(app)

    async def three_turns(page):
        return await page.js("""(async () => {
            const errors = [];
            for (const text of ['first', 'second', 'third']) {
                chatInput.value = text;
                await sendMessage();
                const err = chatWrapper.querySelector('.error-message');
                errors.push(err && err.textContent);
            }
            return {roles: messages.map(m => m.role), errors,
                    bubbles: Array.from(chatWrapper.querySelectorAll('.message.assistant')).map(b => b.textContent)};
        })()""")

    try:
        out = in_page(browser, url + "/", three_turns)
    finally:
        stop(server, thread)
    assert out["errors"] == [None, None, None]
    assert out["roles"] == ["user", "user", "user"] and out["bubbles"] == ["(no reply)"] * 3

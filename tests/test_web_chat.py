"""The web chat page (hetero_rt/serve/static/index.html) in a real headless chromium, driven by selenium,
against the real server (hetero_rt.serve.app.build_app, uvicorn on 127.0.0.1) over a tiny random
checkpoint: a reply streams in chunks and equals the greedy reply of the same messages; the page sends
the whole conversation each turn; Enter sends and Shift+Enter adds a line; text is never parsed as HTML;
Stop ends a reply and keeps the part shown; the API key field sends `Authorization: Bearer`."""
import importlib.util
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlencode

import pytest

import hetero_rt

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", \
    shutil.which("chromedriver") or "/usr/bin/chromedriver"
NO_BROWSER = "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
NO_SELENIUM = "selenium not installed (pip install selenium)"
pytestmark = [pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                                 reason=NO_BROWSER),
              pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason=NO_SELENIUM)]

N = 24            # max_tokens of every reply
WAIT_S = 120      # generous: a loaded 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hetero_rt.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", synthetic_config("tiny"),
                                      seed=0, dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny):
    """A runtime of its own for the expected replies (never the one serving, so no shared cache)."""
    return hetero_rt.load(tiny)


@contextmanager
def serving(app):
    """uvicorn serving app on a free 127.0.0.1 port in a background thread; yields the base URL."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(tiny, **kw):
    from hetero_rt.serve.app import build_app
    return serving(build_app(hetero_rt.load(tiny), "tiny", **kw))


@pytest.fixture(scope="module")
def server(tiny):
    with serve(tiny) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def open_page(browser, url, **query):
    browser.get(f"{url}/?{urlencode({'temperature': 0, 'max_tokens': N, **query})}")
    browser.get_log("browser")                       # drop what an earlier page logged


def replies(browser):
    from selenium.webdriver.common.by import By
    return browser.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def text_of(el) -> str:
    return el.get_attribute("textContent")           # exact text: no whitespace folding


def wait_reply(browser, k):
    """The k-th reply (0-based) once its stream has ended."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(
        lambda d: len(replies(d)) > k and replies(d)[k].get_attribute("data-done") == "1")
    return replies(browser)[k]


def type_and_send(browser, *keys, click=True):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = browser.find_element(By.ID, "input")
    box.send_keys(*keys)
    if click:
        browser.find_element(By.ID, "send").click()
    else:
        box.send_keys(Keys.ENTER)


def js_errors(browser):
    return [e["message"] for e in browser.get_log("browser") if e.get("source") == "javascript"]


def test_replies_stream_and_equal_greedy_over_the_whole_conversation(server, browser, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    system = {"role": "system", "content": "you answer briefly"}
    first = [system, user("hello <b>there</b> & 'you'")]
    want1 = reference.generate(first, max_new_tokens=N, temperature=0.0)
    open_page(browser, server, system=system["content"])
    type_and_send(browser, first[1]["content"])
    got = wait_reply(browser, 0)
    assert text_of(got) == want1.text and want1.text
    assert int(got.get_attribute("data-chunks")) > 1              # it arrived streamed, not in one piece
    users = browser.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    assert [text_of(u) for u in users] == [first[1]["content"]]
    assert browser.find_elements(By.CSS_SELECTOR, "#messages b") == []   # text, never HTML
    assert "tok/s" in browser.find_element(By.ID, "stats").text

    # Shift+Enter adds a line, Enter sends; the page sends every turn so far
    second = first + [assistant(want1.text), user("and\nthen?")]
    want2 = reference.generate(second, max_new_tokens=N, temperature=0.0)
    type_and_send(browser, "and", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "then?", click=False)
    assert text_of(wait_reply(browser, 1)) == want2.text
    assert browser.find_element(By.ID, "input").get_attribute("value") == ""
    assert js_errors(browser) == []

    # New chat forgets the history (the system prompt stays)
    browser.find_element(By.ID, "new-chat").click()
    assert replies(browser) == []
    want3 = reference.generate([system, user("again")], max_new_tokens=N, temperature=0.0)
    type_and_send(browser, "again")
    assert text_of(wait_reply(browser, 0)) == want3.text


def test_stop_ends_the_reply_and_keeps_the_part_shown(tiny, browser, reference):
    """The served runtime's forwards stop after the 30th (they wait on an event, not a clock) until
    Stop has been clicked, so Stop always lands mid-reply."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from hetero_rt.serve.app import build_app
    rt = hetero_rt.load(tiny)
    fast, calls, clicked = rt.batcher.forward, [0], threading.Event()

    def held(*args, **kw):
        calls[0] += 1
        if calls[0] > 30:
            clicked.wait(WAIT_S)
        return fast(*args, **kw)
    rt.batcher.forward = held
    with serving(build_app(rt, "tiny")) as url:
        open_page(browser, url, max_tokens=400)
        type_and_send(browser, "count to a thousand")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(
            lambda d: replies(d) and int(replies(d)[0].get_attribute("data-chunks")) >= 3)
        browser.find_element(By.ID, "stop").click()
        stopped = wait_reply(browser, 0)
        clicked.set()
        partial = text_of(stopped)
        assert "stopped" in stopped.get_attribute("class") and int(stopped.get_attribute("data-chunks")) < 400
        assert browser.find_element(By.ID, "send").is_enabled()
        assert not browser.find_element(By.ID, "stop").is_enabled()
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys(str(N))
        history = [user("count to a thousand"), assistant(partial), user("go on")]
        want = reference.generate(history, max_new_tokens=N, temperature=0.0)
        type_and_send(browser, "go on")
        assert text_of(wait_reply(browser, 1)) == want.text
        assert js_errors(browser) == []


def test_api_key_is_sent_as_bearer_and_kept(tiny, browser, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    with serve(tiny, api_key="sekrit") as url:
        open_page(browser, url)
        type_and_send(browser, "hi")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.error"))
        assert "401" in browser.find_element(By.CSS_SELECTOR, "#messages .message.error").text
        assert replies(browser) == []                                   # the failed turn left no reply
        assert browser.find_element(By.ID, "input").get_attribute("value") == "hi"   # back to retry
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        browser.find_element(By.ID, "api-key").send_keys("sekrit")
        browser.find_element(By.ID, "send").click()
        want = reference.generate([user("hi")], max_new_tokens=N, temperature=0.0)
        assert text_of(wait_reply(browser, 0)) == want.text
        assert browser.execute_script("return localStorage.getItem('hetero_rt.api_key')") == "sekrit"
        open_page(browser, url)                                        # a new visit still has the key
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == "sekrit"
        assert js_errors(browser) == []

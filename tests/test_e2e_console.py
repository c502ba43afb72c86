"""The web console in a real browser (headless Chromium) on a real 2-rank pipeline ring with an
API key: the key gate, both ranks and their layers, a chat streamed into the page, the stop
button ending the request on rank 0, markdown that never runs as markup, tool calls, and a
rank killed with SIGKILL shown until the keeper's new ring serves, the restart counted. One
ring for the module; the kill comes last."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from ringserve.cluster.process_identity import OURS, ownership
from ringserve.model.demo import ensure_demo_model
from tests.browser import chromium, unavailable_reason, wait_for
from tests.ring import Ring, no_eos, running_ring

NO_BROWSER = unavailable_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(NO_BROWSER is not None, reason=str(NO_BROWSER))]

KEY = "console-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLOCK_TOOL = {
    "type": "function",
    "function": {
        "name": "clock",
        "description": "The time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Ring]:
    with running_ring(
        tmp_path_factory.mktemp("console"), models_dir, api_key=KEY, parallel="pipeline"
    ) as ring:
        yield ring


@pytest.fixture(scope="module")
def forbid_eos(models_dir: Path) -> dict[str, float]:
    return no_eos(ensure_demo_model(models_dir, "tiny"))


@pytest.fixture(scope="module")
def chromium_for_module() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def browser(chromium_for_module: WebDriver, ring: Ring) -> WebDriver:
    """The module's browser, on a blank page with nothing kept from the test before."""
    chromium_for_module.get(f"{ring.url}/console/console.css")  # the server's origin
    chromium_for_module.execute_script("localStorage.clear()")
    chromium_for_module.get("about:blank")
    return chromium_for_module


def api(ring: Ring, path: str) -> dict[str, Any]:
    reply = httpx.get(f"{ring.url}{path}", headers=AUTH, timeout=30)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def open_console(browser: WebDriver, ring: Ring) -> None:
    """The page, with the key given as a person gives it."""
    browser.get(f"{ring.url}/")
    wait_for(browser, lambda: browser.find_element(By.ID, "key-gate").is_displayed())
    browser.find_element(By.ID, "key-input").send_keys(KEY, Keys.ENTER)
    wait_for(browser, lambda: browser.find_element(By.ID, "app").is_displayed())


def rank_rows(browser: WebDriver) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, "#ranks tbody tr")


def set_settings(browser: WebDriver, **values: str) -> None:
    settings = browser.find_element(By.ID, "settings")
    if not settings.get_attribute("open"):
        settings.find_element(By.TAG_NAME, "summary").click()
    for name, value in values.items():
        field = browser.find_element(By.ID, f"set-{name.replace('_', '-')}")
        field.clear()
        field.send_keys(value)


def answers(browser: WebDriver) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def last_answer(browser: WebDriver) -> WebElement:
    """The latest answer (its element is replaced as it streams: look it up each time)."""
    return answers(browser)[-1]


def send(browser: WebDriver, text: str) -> None:
    """Type a message and send it, as a person does; returns once its answer is in the page."""
    before = len(answers(browser))
    browser.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)
    wait_for(browser, lambda: len(answers(browser)) > before)


def answer_state(browser: WebDriver) -> tuple[str | None, int]:
    """The latest answer's status, and how much of its text the page shows."""
    answer = last_answer(browser)
    content = answer.find_elements(By.CLASS_NAME, "content")
    return answer.get_attribute("data-status"), len(content[0].text) if content else 0


def watch_answers(browser: WebDriver) -> None:
    """Records every state the latest answer shows, however fast the ring answers."""
    browser.execute_script(
        """
        window.answersSeen = [];
        new MutationObserver(() => {
          const all = document.querySelectorAll(".msg.assistant");
          const last = all[all.length - 1];
          if (!last) return;
          const content = last.querySelector(".content");
          window.answersSeen.push([last.dataset.status, content ? content.textContent.length : 0]);
        }).observe(document.body, {subtree: true, childList: true, characterData: true,
                                   attributes: true});
        """
    )


def seen_answers(browser: WebDriver) -> list[tuple[str, int]]:
    return [
        (status, length) for status, length in browser.execute_script("return window.answersSeen")
    ]


def test_without_the_right_key_the_page_shows_nothing_of_the_ring(
    ring: Ring, browser: WebDriver
) -> None:
    assert f"console at {ring.url}/ " in " ".join(ring.start_log.split())  # launch.py start
    assert httpx.get(f"{ring.url}/console/state").status_code == 401
    browser.get(f"{ring.url}/")
    wait_for(browser, lambda: browser.find_element(By.ID, "key-gate").is_displayed())
    browser.find_element(By.ID, "key-input").send_keys("not-the-key", Keys.ENTER)
    error = browser.find_element(By.ID, "key-error")
    wait_for(browser, error.is_displayed)
    assert "refused" in error.text
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert not rank_rows(browser)
    assert "ringserve-tiny" not in browser.page_source  # the served model's name
    assert "pipeline" not in browser.find_element(By.TAG_NAME, "body").text

    browser.find_element(By.ID, "key-input").send_keys(KEY, Keys.ENTER)
    wait_for(browser, lambda: len(rank_rows(browser)) == 2)
    assert "ringserve-tiny" in browser.find_element(By.ID, "model-facts").text


def test_the_page_shows_both_ranks_with_their_hosts_and_layers(
    ring: Ring, browser: WebDriver
) -> None:
    open_console(browser, ring)
    wait_for(
        browser,
        lambda: [r.get_attribute("data-state") for r in rank_rows(browser)] == ["alive", "alive"],
    )
    info, reports = api(ring, "/model/info"), api(ring, "/gpu/info")["ranks"]
    assert info["parallel"] == "pipeline"
    facts = browser.find_element(By.ID, "model-facts").text
    assert "ringserve-tiny" in facts and "pipeline over 2 ranks" in facts
    pids = {p.rank: p.pid for p in ring.state.ranks}
    rows = rank_rows(browser)
    layers_seen = []
    for share, report, row in zip(info["split"], reports, rows, strict=True):
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        first, end = share["layers"]
        span = str(first) if end - first == 1 else f"{first}–{end - 1}"
        assert cells[0] == str(share["rank"])
        count = end - first
        assert cells[4] == f"{span} ({count} layer{'s' if count > 1 else ''})"  # what it runs
        assert report["hostname"] in cells[2] and f"pid {pids[share['rank']]}" in cells[2]
        assert cells[3].startswith(report["platform"])
        layers_seen.append(cells[4])
    assert len(set(layers_seen)) == 2  # a pipeline: each rank its own layers
    assert browser.find_element(By.ID, "ring-status").text == "serving"


def test_a_message_streams_into_the_page_and_stays_after_a_reload(
    ring: Ring, browser: WebDriver, forbid_eos: dict[str, float]
) -> None:
    open_console(browser, ring)
    set_settings(
        browser, max_tokens="120", temperature="0", extra=json.dumps({"logit_bias": forbid_eos})
    )
    watch_answers(browser)
    send(browser, "Tell me about the ring.")
    wait_for(browser, lambda: last_answer(browser).get_attribute("data-status") == "done", 60)
    streamed = {length for status, length in seen_answers(browser) if status == "streaming"}
    assert len(streamed - {0}) >= 2  # the text grew while the answer was still streaming
    done = last_answer(browser)
    assert "120 tokens" in done.find_element(By.CLASS_NAME, "meta").text
    text = done.find_element(By.CLASS_NAME, "content").text
    assert text

    browser.refresh()  # the conversation is kept in this browser
    wait_for(browser, lambda: browser.find_element(By.ID, "app").is_displayed())
    assert last_answer(browser).find_element(By.CLASS_NAME, "content").text == text
    titles = browser.find_elements(By.CSS_SELECTOR, "#conversation-list .open")
    assert [t.text for t in titles] == ["Tell me about the ring."]

    browser.find_element(By.ID, "new-conversation").click()  # a second conversation
    assert not answers(browser)
    titles = browser.find_elements(By.CSS_SELECTOR, "#conversation-list .open")
    assert [t.text for t in titles] == ["New chat", "Tell me about the ring."]
    titles[1].click()
    assert last_answer(browser).find_element(By.CLASS_NAME, "content").text == text


def test_stop_ends_the_request_on_rank_0(
    ring: Ring, browser: WebDriver, forbid_eos: dict[str, float]
) -> None:
    open_console(browser, ring)
    set_settings(browser, max_tokens="8000", extra=json.dumps({"logit_bias": forbid_eos}))
    send(browser, "Say something long.")
    wait_for(browser, lambda: answer_state(browser)[1] > 20)
    assert api(ring, "/model/info")["running"] == 1  # ~80 s of tokens to go

    browser.find_element(By.ID, "stop").click()
    wait_for(browser, lambda: last_answer(browser).get_attribute("data-status") == "stopped")
    deadline = time.monotonic() + 10
    while (info := api(ring, "/model/info"))["running"] or info["queued"]:
        assert time.monotonic() < deadline, f"rank 0 still generates: {info}"
        time.sleep(0.1)
    generated = info["generated_tokens"]
    time.sleep(1.0)
    assert api(ring, "/model/info")["generated_tokens"] == generated  # nothing generates
    assert generated < 8000
    assert browser.find_element(By.ID, "send").is_displayed()


def test_model_text_is_rendered_as_markdown_and_never_runs(ring: Ring, browser: WebDriver) -> None:
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    markdown = (
        "## Plan\n\nSome **bold**, *em* and `x < y` text.\n\n- one\n- two\n\n"
        "```python\nprint('<b>hi</b>')\n```\n\n"
        "[safe](https://example.org) [bad](javascript:window.pwned=3)\n\n" + hostile
    )
    stored = {
        "active": "c1",
        "items": [
            {
                "id": "c1",
                "title": "stored",
                "messages": [
                    {"role": "user", "content": hostile},
                    {
                        "role": "assistant",
                        "status": "done",
                        "reasoning": "First I think. " + hostile,
                        "content": markdown,
                        "toolCalls": [
                            {"id": "t1", "name": "clock", "arguments": '{"city": "<i>"}'}
                        ],
                    },
                ],
            }
        ],
    }
    browser.get(f"{ring.url}/")
    browser.execute_script(
        "localStorage.setItem('ringserve.console.conversations', arguments[0]);"
        "localStorage.setItem('ringserve.console.key', arguments[1]);",
        json.dumps(stored),
        KEY,
    )
    browser.refresh()
    wait_for(browser, lambda: browser.find_element(By.ID, "app").is_displayed())
    messages = browser.find_element(By.ID, "messages")
    answer = last_answer(browser)
    content = answer.find_element(By.CLASS_NAME, "content")
    assert content.find_element(By.TAG_NAME, "h2").text == "Plan"
    assert content.find_element(By.TAG_NAME, "strong").text == "bold"
    assert content.find_element(By.TAG_NAME, "em").text == "em"
    assert [li.text for li in content.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
    assert content.find_element(By.CSS_SELECTOR, "pre code").text == "print('<b>hi</b>')"
    links = content.find_elements(By.TAG_NAME, "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/"]
    assert "bad" in content.text
    assert hostile in content.text  # shown as the characters the model wrote
    assert hostile in messages.find_element(By.CLASS_NAME, "user-text").text
    reasoning = answer.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert reasoning.get_attribute("open") is None  # folded
    reasoning.find_element(By.TAG_NAME, "summary").click()
    assert hostile in reasoning.text
    call = answer.find_element(By.CLASS_NAME, "tool-call")
    assert "tool call: clock" in call.text and '"city": "<i>"' in call.text
    assert not messages.find_elements(By.CSS_SELECTOR, "img, script, b, i")
    assert browser.execute_script("return window.pwned") is None


def test_a_tool_call_streams_in_as_a_tool_call(ring: Ring, browser: WebDriver) -> None:
    open_console(browser, ring)
    extra = {"tools": [CLOCK_TOOL], "tool_choice": "required"}
    set_settings(browser, max_tokens="200", extra=json.dumps(extra))
    send(browser, "What time is it in Paris?")
    wait_for(browser, lambda: last_answer(browser).get_attribute("data-status") == "done", 60)
    answer = last_answer(browser)
    call = answer.find_element(By.CLASS_NAME, "tool-call")
    assert call.find_element(By.CLASS_NAME, "tool-name").text == "tool call: clock"
    arguments = json.loads(call.find_element(By.TAG_NAME, "pre").text)
    assert arguments["city"] in ("Paris", "Oslo")  # as the schema says
    assert "finish: tool_calls" in answer.find_element(By.CLASS_NAME, "meta").text


# Last: it breaks the module's ring (which its keeper then restarts).
def test_a_killed_rank_shows_then_the_restarted_ring_serves_with_the_restart_counted(
    ring: Ring, browser: WebDriver
) -> None:
    open_console(browser, ring)
    wait_for(
        browser,
        lambda: [r.get_attribute("data-state") for r in rank_rows(browser)] == ["alive", "alive"],
    )
    assert figure(browser, "restarts") == "0"
    rank1 = next(p for p in ring.state.ranks if p.rank == 1)
    assert ownership(rank1.pid, rank1.identity) == OURS
    os.kill(rank1.pid, signal.SIGKILL)
    # Rank 0 leaves the ring it lost a peer of: the page shows the ring not serving, and rank 1
    # dead while rank 0 still says so, until the keeper's new ring serves.
    wait_for(browser, lambda: browser.find_element(By.ID, "ring-status").text != "serving", 10)
    wait_for(
        browser,
        lambda: (
            browser.find_element(By.ID, "ring-status").text == "serving"
            and [r.get_attribute("data-state") for r in rank_rows(browser)] == ["alive", "alive"]
        ),
        60,
    )
    assert figure(browser, "restarts") == "1"
    card = browser.find_element(By.CSS_SELECTOR, '[data-figure="restarts"]')
    assert f"rank 1 (pid {rank1.pid}" in card.text and "died" in card.text
    assert f"pid {rank1.pid}" not in rank_rows(browser)[1].text  # a new process serves rank 1


def figure(browser: WebDriver, key: str) -> str:
    card = browser.find_element(By.CSS_SELECTOR, f'[data-figure="{key}"]')
    return str(card.find_element(By.CLASS_NAME, "figure-value").text)

"""The demo app (example_flask) in real headless Chromium, under real servers."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokers import RedisBroker
from tests.support.browsers import Browsers, screenshot
from tests.support.servers import ROOT, Server

APP = "example_flask:create_app()"
LIVE = 2.0  # seconds within which an edit in one page must show in another
FORBIDDEN = {"code": "forbidden", "message": "not allowed to subscribe to items/3"}


def start(kind: str, db: Path, port: int = 0, **config: Any) -> Server:
    return Server(kind, {"DATABASE": str(db), **config}, app=APP, ready_path="/", port=port)


def post(server: Server, path: str, body: Any = None) -> None:
    req = urllib.request.Request(server.http + path, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read()) == {"ok": True}


@pytest.fixture(scope="module", params=["flask", "gunicorn"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def demo(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start(kind, tmp_path_factory.mktemp("demo") / "items.sqlite")
    yield server
    server.stop()


@pytest.fixture
def fresh(demo: Server) -> Server:
    """The demo server with its rows as they were at the start."""
    post(demo, "/reset")
    return demo


def wait(driver: Any, condition: Any, timeout: float = 10.0, message: str = "") -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A page that reloads while it is read raises these: read it again.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, ignored_exceptions=ignored).until(condition, message)


def text(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, selector).text)


def received(driver: Any, id: str) -> list[dict[str, Any]]:
    return driver.execute_script("return demo.received.filter(r => r.id === arguments[0])", id)  # type: ignore[no-any-return]


def open_page(driver: Any, server: Server, user: str | None = None) -> None:
    """Load the demo page (as ``user``), connected and holding each row's current state."""
    from selenium.webdriver.common.by import By

    driver.get(server.http + "/")
    if user is not None:
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

        before = driver.find_element(By.ID, "user")
        driver.find_element(By.CSS_SELECTOR, f'.who button[value="{user}"]').click()

        def reloaded(d: Any) -> bool:
            try:
                before.is_enabled()
            except StaleElementReferenceException:
                return True
            except WebDriverException as exc:  # Chromium, mid-navigation, reports the old node this way
                if "does not belong to the document" in str(exc):
                    return True
                raise
            return False

        wait(driver, reloaded, message="the page to reload")
        wait(driver, lambda d: text(d, "#user") == user, message=f"signed in as {user}")
    wait(driver, lambda d: text(d, "#state") == "open", message="the connection indicator to say open")
    ids = [tr.get_attribute("data-id") for tr in driver.find_elements(By.CSS_SELECTOR, "#items tr[data-id]")]
    wait(driver, lambda d: all(received(d, id) for id in ids), message="the first push of every row")


def edit(driver: Any, item: int, **fields: str) -> None:
    """Edit an item with the page's form and save it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.find_element(By.CSS_SELECTOR, f"#item-{item} button.edit").click()
    wait(driver, lambda d: text(d, "#edit-id") == str(item))
    for name, value in fields.items():
        element = driver.find_element(By.CSS_SELECTOR, f"#edit [name={name}]")
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "#edit button").click()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_edit_in_one_page_shows_in_the_other(fresh: Server, browsers: Browsers) -> None:
    a, b = browsers.get(0), browsers.get(1)
    open_page(a, fresh)
    open_page(b, fresh)
    edit(a, 1, value="42 crates", owner="bob")
    wait(b, lambda d: text(d, "#item-1 .value") == "42 crates", LIVE, "the edit to reach the other page")
    wait(b, lambda d: text(d, "#item-1 .owner") == "Bob Baker", LIVE, "the new owner to reach the other page")
    wait(a, lambda d: text(d, "#edit-status") == "saved")
    assert text(a, "#item-1 .value") == "42 crates"
    # One push carries two rows: the item and its owner.
    rows = [r["row"] for r in received(b, "1") if "row" in r]
    assert {"type": "user", "id": "bob", "name": "Bob Baker"} in rows
    assert any(row["type"] == "item" and row["value"] == "42 crates" for row in rows)
    screenshot(b, f"demo-two-pages-{fresh.kind}")


def value_of(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, selector).get_property("value"))


def test_the_edit_form_follows_changes_made_elsewhere_and_saves_only_its_own(
    fresh: Server, browsers: Browsers
) -> None:
    from selenium.webdriver.common.by import By

    a, b = browsers.get(0), browsers.get(1)
    open_page(a, fresh)
    open_page(b, fresh)
    b.find_element(By.CSS_SELECTOR, "#item-2 button.edit").click()
    wait(b, lambda d: value_of(d, "#edit [name=value]") == "5")
    # A field not edited in b follows a's change.
    edit(a, 2, value="7 boxes")
    wait(b, lambda d: value_of(d, "#edit [name=value]") == "7 boxes", LIVE, "the form to follow the change")
    assert not b.find_element(By.ID, "edit-note").is_displayed()
    # b edits the name; a changes the name too: b keeps its edit and is told.
    name = b.find_element(By.CSS_SELECTOR, "#edit [name=name]")
    name.clear()
    name.send_keys("nashi")
    edit(a, 2, name="conference pears", owner="alice")
    wait(b, lambda d: d.find_element(By.ID, "edit-note").is_displayed(), LIVE, "the note about the clash")
    assert text(b, "#edit-note") == ('Item 2 changed meanwhile: name is now “conference pears”. '
                                     "Saving keeps your edits.")
    assert value_of(b, "#edit [name=name]") == "nashi"
    assert value_of(b, "#edit [name=owner]") == "alice"  # not edited in b: followed
    screenshot(b, f"demo-edit-clash-{fresh.kind}")
    # Saving sends b's edit only: a's value and owner stay.
    b.find_element(By.CSS_SELECTOR, "#edit button").click()
    wait(a, lambda d: text(d, "#item-2 .name") == "nashi", LIVE, "b's save to reach a")
    assert text(a, "#item-2 .value") == "7 boxes"
    assert text(a, "#item-2 .owner") == "Alice Archer"
    wait(b, lambda d: text(d, "#edit-status") == "saved")
    assert not b.find_element(By.ID, "edit-note").is_displayed()


def test_a_deleted_item_shows_as_gone(fresh: Server, browsers: Browsers) -> None:
    from selenium.webdriver.common.by import By

    a, b = browsers.get(0), browsers.get(1)
    open_page(a, fresh)
    open_page(b, fresh)
    a.find_element(By.CSS_SELECTOR, "#item-2 form.delete button").click()
    wait(b, lambda d: "gone" in d.find_element(By.ID, "item-2").get_attribute("class"), LIVE, "item 2 gone")
    assert text(b, "#item-2 .value") == "deleted"
    assert {"id": "2", "gone": True} in received(b, "2")
    post(fresh, "/reset")  # the item comes back, and so does its row
    wait(b, lambda d: text(d, "#item-2 .value") == "5", LIVE, "item 2 back")
    assert "gone" not in b.find_element(By.ID, "item-2").get_attribute("class")


def test_a_user_never_receives_an_item_they_may_not_see(fresh: Server, browsers: Browsers) -> None:
    alice, bob = browsers.get(0), browsers.get(1)
    open_page(alice, fresh, user="alice")
    open_page(bob, fresh, user="bob")
    assert text(alice, "#item-3 .name") == "plums"  # alice's private item
    assert "plums" not in bob.page_source
    # Bob's page asks for it anyway, and is refused.
    bob.execute_script("""demo.es.subscribe("items", "3", {
        onPush: (row) => demo.received.push({id: "3", row}),
        onError: (error) => demo.received.push({id: "3", error})})""")
    wait(bob, lambda d: received(d, "3"), message="an answer to bob's subscribe")
    assert received(bob, "3") == [{"id": "3", "error": FORBIDDEN}]
    edit(alice, 3, value="secret plums")
    wait(alice, lambda d: text(d, "#item-3 .value") == "secret plums", LIVE)
    # A later change that bob may see reaches him: the earlier one had its chance.
    edit(alice, 1, value="public apples")
    wait(bob, lambda d: text(d, "#item-1 .value") == "public apples", LIVE)
    assert received(bob, "3") == [{"id": "3", "error": FORBIDDEN}]
    assert "secret plums" not in bob.page_source


def tasks(driver: Any, list_id: int) -> list[str]:
    """The tasks the page shows in a list, as "title" or "done title"."""
    from selenium.webdriver.common.by import By

    shown = []
    for li in driver.find_elements(By.CSS_SELECTOR, f"#list-{list_id} li"):
        title = li.find_element(By.CSS_SELECTOR, ".title").text.lstrip("\u2713 ")
        shown.append(("done " if "done" in li.get_attribute("class").split() else "") + title)
    return shown


def test_a_live_list_follows_adds_deletes_moves_and_a_bulk_statement(fresh: Server, browsers: Browsers) -> None:
    from selenium.webdriver.common.by import By

    a, b = browsers.get(0), browsers.get(1)
    open_page(a, fresh)
    open_page(b, fresh)
    for page in (a, b):
        wait(page, lambda d: tasks(d, 1) == ["milk", "bread"] and tasks(d, 2) == ["laundry", "done dishes"],
             message="both lists drawn from their first push")
    # Add in one page: the other shows it.
    a.find_element(By.CSS_SELECTOR, "#list-1 form.add input").send_keys("eggs")
    a.find_element(By.CSS_SELECTOR, "#list-1 form.add button").click()
    wait(b, lambda d: tasks(d, 1) == ["milk", "bread", "eggs"], LIVE, "the added task in the other page")
    # Move: it leaves one list and joins the other, in both pages.
    a.find_element(By.CSS_SELECTOR, '#list-1 li[data-id="1"] button.move').click()
    wait(b, lambda d: tasks(d, 1) == ["bread", "eggs"] and tasks(d, 2) == ["milk", "laundry", "done dishes"],
         LIVE, "the moved task in its new list only")
    # Delete.
    b.find_element(By.CSS_SELECTOR, '#list-1 li[data-id="2"] button.delete').click()
    wait(a, lambda d: tasks(d, 1) == ["eggs"], LIVE, "the deleted task gone from the other page")
    # A bulk UPDATE: no instance is loaded, and both pages still follow.
    a.find_element(By.CSS_SELECTOR, "#list-2 button.all-done").click()
    for page in (a, b):
        wait(page, lambda d: tasks(d, 2) == ["done milk", "done laundry", "done dishes"], LIVE,
             "every task of list 2 done")
    assert tasks(b, 1) == ["eggs"]
    assert text(b, "#list-2 .count") == "(0 to do)"
    # What the client handed the page: the whole set, each time.
    assert [row["title"] for row in b.execute_script("return demo.lists['2']")] == ["milk", "laundry", "dishes"]
    screenshot(b, f"demo-lists-{fresh.kind}")


def test_the_page_reconnects_after_a_restart_and_shows_what_changed_meanwhile(
    kind: str, browsers: Browsers, tmp_path: Path
) -> None:
    db, port = tmp_path / "items.sqlite", free_port()
    server = start(kind, db, port)
    try:
        page = browsers.get(0)
        open_page(page, server)
        server.stop()
        wait(page, lambda d: text(d, "#state") != "open", message="the page to notice the server is gone")
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE items SET value = 'changed while down' WHERE id = 1")
        server = start(kind, db, port)
        wait(page, lambda d: text(d, "#item-1 .value") == "changed while down", 20, "the change made while down")
        assert text(page, "#state") == "open"
    finally:
        server.stop()


def test_the_mutator_changes_item_1_every_second(browsers: Browsers, tmp_path: Path) -> None:
    server = start("gunicorn", tmp_path / "items.sqlite", EXAMPLE_MUTATE=True)
    try:
        page = browsers.get(0)
        open_page(page, server, user="admin")
        values = [text(page, "#item-1 .value")]
        for _ in range(2):
            values.append(wait(page, lambda d: (v := text(d, "#item-1 .value")) != values[-1] and v, 3,
                               "the mutator's next change"))
        assert all(len(v) == 8 and v.count(":") == 2 for v in values[1:]), values  # HH:MM:SS
        assert len(page.find_elements("css selector", "#items tr[data-id]")) == 4  # admin sees every item
        screenshot(page, "demo")
    finally:
        server.stop()



def test_two_servers_and_a_mutator_process_share_a_redis_bus(browsers: Browsers, tmp_path: Path) -> None:
    """The README's commands for two servers: flask run and gunicorn on one Redis, plus `flask mutate`."""
    broker = RedisBroker()
    db = tmp_path / "items.sqlite"
    config = {"ENTITYSYNC_BUS_URL": broker.url(), "ENTITYSYNC_TOPIC_PREFIX": f"demo{os.getpid()}-"}
    one, two = start("flask", db, **config), start("gunicorn", db, **config)
    try:
        a, b = browsers.get(0), browsers.get(1)
        open_page(a, one)
        open_page(b, two)
        edit(a, 2, value="via redis")
        wait(b, lambda d: text(d, "#item-2 .value") == "via redis", LIVE, "the edit to cross servers")
        env = dict(os.environ, **{f"FLASK_{k}": json.dumps(v) for k, v in {"DATABASE": str(db), **config}.items()})
        mutator = subprocess.Popen([sys.executable, "-m", "flask", "--app", "example_flask", "mutate"],
                                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait(b, lambda d: text(d, "#item-1 .value").count(":") == 2, 5, "the mutator's change on server two")
            wait(a, lambda d: text(d, "#item-1 .value").count(":") == 2, LIVE, "the mutator's change on server one")
        finally:
            mutator.terminate()
            mutator.wait(timeout=10)
    finally:
        one.stop()
        two.stop()

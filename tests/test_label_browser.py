"""The labelling page in a real headless Chromium: name, keys, clicks, undo, export; HTML never runs."""
import json
import os
import shutil
import sqlite3

from conftest import run_cli
from label_helpers import chrome_driver, ensure_chromium, start_server, stop, write_pairs

XSS_A = "<script>window.__pwned = 1</script>"
XSS_B = '<img src=x onerror="window.__pwned = 2"> and <b>bold</b>'
PAIRS = [
    {"prompt": "Say something kind.", "completions": ["You are great.", "Whatever.", "Have a lovely day!"]},
    {"prompt": "Show me <b>markup</b>", "completions": [XSS_A, XSS_B]},
]


def test_label_flow_in_chromium(tmp_path):
    chrome, driver_path = ensure_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)  # 3 + 1 = 4 comparisons
    db = tmp_path / "labels.sqlite"
    proc, url = start_server(pairs, db)
    driver = chrome_driver(chrome, driver_path, tmp_path / "profile")
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "name").is_displayed())
        driver.find_element(By.ID, "name").send_keys("alice")
        driver.find_element(By.ID, "start").click()

        def shown():
            """(prompt, A text, B text) once the task is on screen; asserts nothing HTML ran."""
            wait.until(lambda d: d.find_element(By.ID, "prompt").text)
            assert driver.execute_script("return window.__pwned") is None, "HTML from a completion was executed"
            assert not driver.find_elements(By.CSS_SELECTOR, ".completion img, .completion b, .completion script")
            return tuple(driver.execute_script(f"return document.getElementById('{i}').textContent")
                         for i in ("prompt", "text-a", "text-b"))

        def wait_progress(n):
            wait.until(lambda d: f"you: {n} / 4 done" in d.find_element(By.ID, "progress").text)

        body = driver.find_element(By.TAG_NAME, "body")
        seen = [shown()]
        body.send_keys("1")                                    # A better, by key
        wait_progress(1)
        seen.append(shown())
        driver.find_element(By.ID, "comment").send_keys("b reads better; 1 t x typed here are not shortcuts")
        driver.find_element(By.ID, "btn-b").click()            # B better, by click, with a comment
        wait_progress(2)
        if os.environ.get("PREFALIGN_SCREENSHOT_DIR"):         # for a person to look at the page
            driver.save_screenshot(os.path.join(os.environ["PREFALIGN_SCREENSHOT_DIR"], "label-page.png"))
        body.send_keys("u")                                    # undo: the second item comes back
        wait_progress(1)
        assert shown() == seen[1]
        assert "not shortcuts" in driver.find_element(By.ID, "comment").get_attribute("value")
        driver.find_element(By.ID, "btn-a").click()            # answer it again: A better this time
        wait_progress(2)
        seen.append(shown())
        body.send_keys("t")                                    # tie
        wait_progress(3)
        seen.append(shown())
        body.send_keys("x")                                    # both bad
        wait_progress(4)
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
        assert driver.execute_script("return window.__pwned") is None
        assert {s[0] for s in seen} == {p["prompt"] for p in PAIRS}
        xss = [s for s in seen if s[0] == PAIRS[1]["prompt"]][0]
        assert set(xss[1:]) == {XSS_A, XSS_B}                  # shown verbatim, as text

        driver.get(url + "/stats")
        assert "alice" in driver.find_element(By.ID, "labelers").text
    finally:
        driver.quit()
        stop(proc)
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)

    conn = sqlite3.connect(db)
    undone = conn.execute("SELECT choice, comment FROM labels WHERE undone_at IS NOT NULL").fetchall()
    assert undone == [("b", "b reads better; 1 t x typed here are not shortcuts")]
    assert conn.execute("SELECT COUNT(*) FROM labels WHERE undone_at IS NULL").fetchone()[0] == 4
    out = tmp_path / "prefs.jsonl"
    run_cli("label", "export", "--db", db, "--output", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 1st item: A better; 2nd: B undone, then A better; tie and both-bad are left out by default.
    expected = [{"prompt": s[0], "chosen": s[1], "rejected": s[2], "n_labels": 1, "agreement": 1.0,
                 "outcome": "preference"} for s in seen[:2]]
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731  (two pairs can share prompt and chosen)
    assert sorted(rows, key=key) == sorted(expected, key=key)

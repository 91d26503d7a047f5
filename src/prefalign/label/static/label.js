// The labelling page. Every text from the server is put in the page with textContent, never
// innerHTML, so completions containing HTML or <script> show as text and never run.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { name: null, item: null, lastKey: null, busy: false };
const KEYS = { "1": "a", a: "a", "2": "b", b: "b", t: "tie", x: "both_bad", s: "skip" };
const SAID = { a: "A better", b: "B better", tie: "tie", both_bad: "both bad", skip: "skipped" };

// A fresh idempotency key per answer: a retry of the same answer reuses it, so the server
// stores it once. getRandomValues works on plain http, unlike crypto.randomUUID.
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function say(text, isError) {
  $("message").textContent = text || "";
  $("message").className = isError ? "error" : "";
}

// POST JSON; network failures are retried (same body, same key), HTTP errors are not.
async function post(url, body) {
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                   body: JSON.stringify(body) });
      return { status: r.status, data: await r.json() };
    } catch (err) {
      if (attempt >= 4) throw err;
      await new Promise((res) => setTimeout(res, 300 * 2 ** attempt));
    }
  }
}

function showProgress(p, lastKey) {
  state.lastKey = lastKey;
  // "done" counts skips too (a skipped item is not served to this person again).
  $("progress").textContent = `you: ${p.mine} / ${p.total} done · ${p.labelled} / ${p.total} answered by anyone`;
}

function show(item) {
  state.item = item;
  $("task").hidden = !item;
  $("done").hidden = !!item;
  if (!item) return;
  $("prompt").textContent = item.prompt;
  $("text-a").textContent = item.a.text;
  $("text-b").textContent = item.b.text;
  $("comment").value = "";
}

async function loadNext() {
  const r = await fetch("api/next?labeler=" + encodeURIComponent(state.name));
  const data = await r.json();
  if (!r.ok) { say(data.error, true); return; }
  showProgress(data.progress, data.last_key);
  show(data.item);
}

async function answer(choice) {
  if (state.busy || !state.item) return;
  state.busy = true;
  const item = state.item;
  const body = { key: newKey(), labeler: state.name, item_id: item.id, choice,
                 shown_a: item.a.index, shown_b: item.b.index, comment: $("comment").value };
  try {
    const r = await post("api/labels", body);
    if (r.status !== 200) say(r.data.error, true);
    else say(`saved: ${SAID[choice]}`);
    if (r.status === 200 || r.status === 409) await loadNext();
  } catch (err) {
    say("could not reach the server; your answer was not saved. Try again.", true);
  } finally {
    state.busy = false;
  }
}

async function undo() {
  if (state.busy) return;
  if (!state.lastKey) { say("nothing to undo"); return; }
  state.busy = true;
  try {
    const r = await post("api/undo", { labeler: state.name, key: state.lastKey });
    if (r.status !== 200) { say(r.data.error, true); return; }
    showProgress(r.data.progress, r.data.last_key);
    show(r.data.item);
    $("comment").value = r.data.comment || "";
    say(`undone: ${SAID[r.data.choice]} — answer this one again`);
  } catch (err) {
    say("could not reach the server; nothing was undone.", true);
  } finally {
    state.busy = false;
  }
}

function start(name) {
  state.name = name;
  localStorage.setItem("prefalign-labeler", name);
  $("who-name").textContent = name;
  $("who").hidden = false;
  $("name-form").hidden = true;
  loadNext();
}

function askName() {
  $("name-form").hidden = false;
  $("task").hidden = true;
  $("done").hidden = true;
  $("who").hidden = true;
  $("name").value = state.name || "";
  $("name").focus();
}

document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "TEXTAREA"].includes(e.target.tagName);
  if (typing || e.ctrlKey || e.metaKey || e.altKey || !state.name) return;
  const key = e.key.toLowerCase();
  if (key === "u") { e.preventDefault(); undo(); }
  else if (KEYS[key] && state.item) { e.preventDefault(); answer(KEYS[key]); }
});

document.querySelectorAll("button[data-choice]").forEach((b) =>
  b.addEventListener("click", () => answer(b.dataset.choice)));
$("btn-undo").addEventListener("click", undo);
$("btn-undo-done").addEventListener("click", undo);
$("change-name").addEventListener("click", askName);
$("name-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("name").value.trim();
  if (name) start(name);
});

const saved = localStorage.getItem("prefalign-labeler");
if (saved) start(saved); else askName();

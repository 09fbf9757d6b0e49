// The chat UI: plain DOM and EventSource, no build step.
//
// An answer is read from its own stream URL with EventSource. When the connection drops, the
// browser reconnects by itself and sends the last event's id as Last-Event-ID, so the server
// resumes right after it. After a reload the page asks the thread for its answer in flight
// (the history stops at that answer's question) and reads the answer's stream from the
// start: what was already said is replayed once, then the live part follows.
"use strict";

const $ = (selector) => document.querySelector(selector);
const ui = {
  threads: $("#threads"),
  messages: $("#messages"),
  empty: $("#empty"),
  title: $("#title"),
  model: $("#model"),
  input: $("#input"),
  send: $("#send"),
  stop: $("#stop"),
  status: $("#status"),
  info: $("#service-info"),
  jump: $("#jump"),
  menu: $("#menu"),
  backdrop: $("#backdrop"),
};
const state = {
  threadId: null,
  stream: null, // the answer being read: {es, turn, run, finished}
  sending: false, // a POST is in flight: a second Enter must not send again (issue 12)
  follow: true, // the view follows new text: the user is at the bottom
  threadsTimer: 0,
  threadsLook: 0, // counts looks at the thread list: only the latest one shows its answer
  threadsTag: "", // the ETag of the list shown, to ask with If-None-Match
  threads: [], // the list shown
  opening: 0, // counts openThread and newChat calls: only the latest one shows its thread
  shownRun: 0, // the latest answer of the open thread this page has read (0: none)
};

// --------------------------------------------------------------------------- HTTP

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  return await readJson(response);
}

// The body of a response; an error with the API's message and code if it is one.
async function readJson(response) {
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.message || response.statusText);
    error.code = data.code;
    error.status = response.status;
    throw error;
  }
  return data;
}

// `source` names what set the line, for the one that may clear it ("threads": the refresh).
function setStatus(text, kind, source) {
  ui.status.textContent = text || "";
  ui.status.className = kind || "";
  ui.status.dataset.source = source || "";
}

// --------------------------------------------------------------------------- scrolling

// The view follows the answer only while the user is at the bottom; scrolled up to read,
// it stays put and offers a button back to the latest text.
function atBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 32;
}

function updateJump() {
  ui.jump.hidden = state.follow || atBottom();
}

function contentChanged() {
  if (state.follow) ui.messages.scrollTop = ui.messages.scrollHeight;
  updateJump();
}

function scrollToLatest() {
  state.follow = true;
  contentChanged();
}

ui.messages.addEventListener("scroll", () => {
  // Content only changes in animation frames, after scroll events: a scroll event always
  // sees the position the user (or scrollToLatest) left.
  state.follow = atBottom();
  updateJump();
});
ui.jump.addEventListener("click", scrollToLatest);

// --------------------------------------------------------------------------- rendering

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(className, text, onClick, title) {
  const node = element("button", className, text);
  node.type = "button";
  if (title) node.title = title;
  node.addEventListener("click", onClick);
  return node;
}

function clearMessages() {
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  state.follow = true;
  updateJump();
}

function addUser(text) {
  ui.empty.hidden = true;
  const message = element("div", "msg user");
  message.append(element("div", "bubble", text));
  ui.messages.append(message);
  contentChanged();
  return message;
}

function addSummary(text) {
  ui.empty.hidden = true;
  const message = element("div", "msg summary");
  message.append(element("div", "bubble", text));
  ui.messages.append(message);
}

// A "turn" is everything the assistant says after one question: tool calls, then text.
function addTurn() {
  ui.empty.hidden = true;
  const el = element("div", "msg assistant");
  const bubble = element("div", "bubble");
  const tools = element("div", "tools");
  const text = element("div", "text markdown");
  const meta = element("div", "meta");
  bubble.append(tools, text);
  el.append(bubble, meta);
  ui.messages.append(el);
  contentChanged();
  return { el, tools, text, meta, raw: "", segmentEnded: false, live: null, frame: 0, calls: {} };
}

function appendText(turn, text) {
  if (turn.segmentEnded && turn.raw) text = "\n\n" + text.replace(/^\s+/, "");
  turn.segmentEnded = false;
  turn.raw += text;
  if (!turn.live) turn.live = new Markdown.LiveMarkdown(turn.text);
  // At most one render per animation frame, however fast the chunks come.
  if (!turn.frame) {
    turn.frame = requestAnimationFrame(() => {
      turn.frame = 0;
      turn.live.update(turn.raw);
      contentChanged();
    });
  }
}

// The final rendering of a turn's text, and its source for whoever needs it (tests, copy).
function settleText(turn) {
  if (turn.frame) cancelAnimationFrame(turn.frame);
  turn.frame = 0;
  Markdown.render(turn.text, turn.raw);
  turn.live = null;
  turn.text.dataset.source = turn.raw;
  contentChanged();
}

function formatArgs(args) {
  return Object.entries(args || {})
    .map(([key, value]) => `${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join(", ");
}

// A tool call, collapsed to its name and input; open, it shows the input and the result.
function addTool(turn, call, status) {
  const tool = element("details", "tool");
  tool.dataset.state = status;
  tool.dataset.name = call.name;
  if (call.id) tool.dataset.callId = call.id;
  const summary = element("summary");
  summary.append(
    element("span", "tool-name", call.name),
    element("span", "tool-args", formatArgs(call.args)),
  );
  const body = element("div", "tool-body");
  body.append(
    element("div", "tool-label", "Input"),
    element("pre", "tool-input", JSON.stringify(call.args || {}, null, 2)),
    element("div", "tool-label", "Result"),
    element("pre", "tool-result", status === "running" ? "running…" : "(not saved)"),
  );
  tool.append(summary, body);
  turn.tools.append(tool);
  if (call.id) turn.calls[call.id] = tool;
  contentChanged();
}

function setToolResult(turn, result) {
  const tool = turn.calls[result.tool_call_id];
  if (!tool) return;
  tool.querySelector(".tool-result").textContent = result.text;
  if (result.status === "error") tool.dataset.state = "failed";
}

function toolsDone(turn) {
  for (const tool of turn.tools.querySelectorAll('.tool[data-state="running"]')) {
    tool.dataset.state = "done";
    const result = tool.querySelector(".tool-result");
    if (result.textContent === "running…") result.textContent = "(shown when the answer ends)";
  }
}

// `state` "error": the answer failed; "unanswered": the saved thread ends with a question
// and nothing says why (an answer stopped before its first word, or lost): no alarm, but the
// same way out.
function showError(turn, message, state = "error") {
  turn.el.dataset.state = state;
  turn.el.querySelector(":scope > .error")?.remove();
  const error = element("div", state === "error" ? "error" : "error notice", message);
  error.append(button("retry", "Retry", retryAnswer));
  turn.el.append(error);
  contentChanged();
}

// The saved thread's `last_error` has a code only; say what it means for the user.
const ERRORS = {
  server_restarted: "The server restarted while writing this answer, and it was lost.",
  producer_lost: "The server writing this answer stopped before it was complete.",
  shutdown: "The server shut down before this answer was complete.",
  start_failed: "This answer could not be started: its storage could not be reached.",
  storage_rollback: "Its storage lost part of this answer (Redis restarted or failed over).",
  not_started: "No worker started this answer in time (are the workers running?).",
  queue_unavailable: "This answer could not be handed to the workers.",
};

function renderHistory(messages, active, lastError) {
  let turn = null;
  for (const message of messages) {
    if (message.role === "user") {
      if (turn) settleText(turn);
      addUser(message.text).dataset.messageId = message.id || "";
      turn = null;
    } else if (message.role === "summary") {
      addSummary("Earlier messages were summarized: " + message.text.replace(/^[^:]*:\s*/, ""));
    } else if (message.role === "assistant") {
      turn = turn || addTurn();
      turn.el.dataset.state = message.stopped ? "stopped" : "done";
      if (message.text) {
        turn.raw += (turn.raw ? "\n\n" : "") + message.text;
      }
      for (const call of message.tool_calls) addTool(turn, call, "done");
      if (message.stopped) turn.meta.replaceChildren(element("span", "stopped-tag", "stopped"));
    } else if (message.role === "tool" && turn) {
      setToolResult(turn, message);
    }
  }
  if (turn) settleText(turn);
  if (active) return;
  const last = messages[messages.length - 1];
  if (lastError) {
    const message = ERRORS[lastError.code] || `The answer failed (${lastError.code}).`;
    showError(turn && last.role !== "user" ? turn : addTurn(), message);
  } else if (last && last.role === "user") {
    showError(addTurn(), "No answer was saved for this question.", "unanswered");
  }
}

// Regenerate (on the last answer) and Edit (on the last question), when nothing streams.
function refreshActions() {
  for (const node of ui.messages.querySelectorAll(".actions")) node.remove();
  if (state.stream || state.sending || !state.threadId) return;
  const messages = [...ui.messages.querySelectorAll(".msg.user, .msg.assistant")];
  const lastUser = messages.findLast((m) => m.classList.contains("user"));
  const last = messages[messages.length - 1];
  if (lastUser && !lastUser.querySelector(".editor")) {
    const actions = element("div", "actions");
    actions.append(button("edit", "Edit", () => startEdit(lastUser), "Edit this message"));
    lastUser.append(actions);
  }
  const settled = last && !["error", "unanswered"].includes(last.dataset.state);
  if (settled && last.classList.contains("assistant")) {
    const actions = element("div", "actions");
    actions.append(button("regenerate", "↻ Regenerate", regenerate, "Answer again"));
    last.querySelector(".meta").append(actions);
  }
  contentChanged();
}

// --------------------------------------------------------------------------- streaming

function updateComposer() {
  const busy = Boolean(state.stream);
  ui.stop.hidden = !busy;
  ui.send.disabled = busy || state.sending;
  refreshActions();
}

function closeStream() {
  if (state.stream) {
    state.stream.finished = true;
    state.stream.es.close();
    const turn = state.stream.turn;
    if (turn.frame) cancelAnimationFrame(turn.frame);
    state.stream = null;
  }
  updateComposer();
}

function attach(url, turn) {
  closeStream();
  const es = new EventSource(url, { withCredentials: true });
  // The answer's number (stream URLs name it): a later one is an answer queued behind it.
  const run = Number(new URL(url, location.href).searchParams.get("run")) || 0;
  const stream = { es, turn, run, finished: false };
  state.stream = stream;
  state.shownRun = Math.max(state.shownRun, run);
  turn.el.dataset.state = "streaming";
  updateComposer();

  es.addEventListener("chunk", (event) => {
    toolsDone(turn);
    appendText(turn, JSON.parse(event.data).text);
  });
  es.addEventListener("tool_call", (event) => addTool(turn, JSON.parse(event.data), "running"));
  es.addEventListener("system", (event) => {
    const data = JSON.parse(event.data);
    if (data.type === "start") {
      const badges = [element("span", "badge", data.model)];
      if (data.cached) badges.push(element("span", "badge cached", "cached answer"));
      turn.meta.replaceChildren(...badges);
    } else if (data.type === "message_ended") {
      turn.segmentEnded = true;
    } else if (data.type === "end") {
      finish(stream, data.reason === "stopped" ? "stopped" : "done");
    } else if (data.type === "error") {
      finish(stream, "error", data.message);
    }
  });
  es.onopen = () => setStatus("");
  es.onerror = () => {
    if (stream.finished) return;
    if (es.readyState === EventSource.CLOSED) {
      // 204 or an HTTP error: this answer cannot be read any more; show the thread as saved.
      closeStream();
      setStatus("The answer is no longer available; showing the saved thread.", "warn");
      if (state.threadId) openThread(state.threadId, { keepStatus: true });
    } else {
      setStatus("Connection lost, reconnecting…", "warn"); // EventSource retries by itself
    }
  };
}

function finish(stream, outcome, message) {
  stream.finished = true;
  stream.es.close();
  if (state.stream === stream) state.stream = null;
  const turn = stream.turn;
  toolsDone(turn);
  settleText(turn);
  turn.el.dataset.state = outcome;
  setStatus(""); // a "reconnecting…" line is stale now
  if (outcome === "stopped") turn.meta.append(element("span", "stopped-tag", "stopped"));
  if (outcome === "error") showError(turn, message || "the answer failed");
  updateComposer();
  loadThreads();
  afterAnswer(turn, stream.run);
}

// Once an answer ends, the saved thread has its tool results (the stream carries calls, not
// results); and an answer queued behind it (BUSY_POLICY=queue, from another tab or the
// terminal client) is in flight now: show the thread as saved, with that answer streaming.
async function afterAnswer(turn, run) {
  // A failed read is not worth a status line: the results stay "shown when the answer
  // ends" until reload.
  const thread = await readOpenThread();
  if (!thread || state.stream || state.sending) return;
  if (thread.active_run && thread.active_run.run > run) {
    openThread(state.threadId);
    return;
  }
  for (const message of thread.messages) {
    if (message.role === "tool") setToolResult(turn, message);
  }
}

// --------------------------------------------------------------------------- actions

// Every action that POSTs goes through here: one at a time, whatever the user presses.
async function post(path, body) {
  if (state.sending || state.stream) return null;
  state.sending = true;
  updateComposer();
  try {
    return await api("POST", path, body);
  } catch (error) {
    if (error.code === "thread_busy" && state.threadId) {
      // Answering for another tab or the terminal client: show that answer, with Stop. The
      // message stays in the box, to send when the answer ends.
      setStatus("This thread is answering elsewhere: send again when it ends.", "warn");
      openThread(state.threadId, { keepStatus: true });
    } else {
      setStatus(error.message, "warn");
    }
    return null;
  } finally {
    state.sending = false;
    updateComposer();
  }
}

async function send(text, { fromInput = false } = {}) {
  text = text.trim();
  if (!text || state.sending || state.stream) return;
  // The input is emptied at once: what the user types while the page is starting or the
  // POST is in flight is theirs to keep. If the message does not go, it comes back in front.
  if (fromInput) ui.input.value = "";
  await ready.catch(() => {}); // a start-up that failed must not stop sending too
  const body = { message: text, model: ui.model.value };
  if (state.threadId) body.thread_id = state.threadId;
  const started = await post("/v1/chat/message", body);
  if (!started) {
    if (fromInput) ui.input.value = ui.input.value ? text + "\n" + ui.input.value : text;
    return;
  }
  setStatus("");
  if (state.threadId !== started.thread_id) {
    state.threadId = started.thread_id;
    history.replaceState(null, "", "#thread=" + started.thread_id);
    clearMessages();
    ui.title.textContent = text.length > 60 ? text.slice(0, 59) + "…" : text;
  }
  addUser(text);
  scrollToLatest();
  attach(started.stream_url, addTurn());
  loadThreads();
}

async function retryAnswer() {
  const started = await post("/v1/chat/message", {
    thread_id: state.threadId,
    retry: true,
    model: ui.model.value,
  });
  if (!started) return;
  // The thread as saved, with the new answer: a retry may ask a question that is not on
  // screen (an edit that failed before it took effect replaces the question shown).
  openThread(state.threadId);
  loadThreads();
}

async function regenerate() {
  const started = await post("/v1/chat/regenerate", {
    thread_id: state.threadId,
    model: ui.model.value,
  });
  if (!started) return;
  setStatus("");
  // The answers after the last question are replaced.
  const messages = [...ui.messages.querySelectorAll(".msg")];
  const lastUser = messages.findLastIndex((m) => m.classList.contains("user"));
  for (const node of messages.slice(lastUser + 1)) node.remove();
  scrollToLatest();
  attach(started.stream_url, addTurn());
  loadThreads();
}

function startEdit(message) {
  const bubble = message.querySelector(".bubble");
  const original = bubble.textContent;
  const editor = element("div", "editor");
  const field = element("textarea", "edit-input");
  field.value = original;
  field.rows = Math.min(8, original.split("\n").length + 1);
  const save = button("save", "Send", () => saveEdit(message, field.value));
  const cancel = button("cancel", "Cancel", () => {
    editor.replaceWith(bubble);
    refreshActions();
  });
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      saveEdit(message, field.value);
    } else if (event.key === "Escape") {
      cancel.click();
    }
  });
  editor.append(field, element("div", "editor-buttons"));
  editor.lastChild.append(cancel, save);
  message.querySelector(".actions")?.remove();
  bubble.replaceWith(editor);
  field.focus();
}

async function saveEdit(message, text) {
  text = text.trim();
  if (!text) return;
  const started = await post("/v1/chat/message", {
    thread_id: state.threadId,
    message: text,
    edit_last: true,
    model: ui.model.value,
  });
  if (!started) return;
  setStatus("");
  message.querySelector(".editor")?.replaceWith(element("div", "bubble", text));
  let next = message.nextElementSibling;
  while (next) {
    const after = next.nextElementSibling;
    next.remove();
    next = after;
  }
  scrollToLatest();
  attach(started.stream_url, addTurn());
  loadThreads();
}

async function stopAnswer() {
  // The answer this page shows, by its number: a Stop clicked as it ends must not stop the
  // answer another tab or the terminal client started just after, nor one queued behind it.
  const stream = state.stream;
  if (!state.threadId || !stream) return;
  const run = stream.run ? "&run=" + stream.run : "";
  try {
    await api("POST", "/v1/chat/stop?thread_id=" + encodeURIComponent(state.threadId) + run);
  } catch (error) {
    setStatus(error.message, "warn");
  }
}

async function openThread(threadId, { keepStatus = false } = {}) {
  closeStream();
  closeDrawer();
  const opening = ++state.opening;
  let thread;
  try {
    thread = await api("GET", "/v1/thread?thread_id=" + encodeURIComponent(threadId));
  } catch (error) {
    if (opening !== state.opening) return;
    newChat();
    setStatus(error.status === 404 ? "That thread does not exist." : error.message, "warn");
    return;
  }
  // Another thread (or a new chat) was clicked while this one loaded: that one is shown.
  if (opening !== state.opening) return;
  if (!keepStatus) setStatus("");
  state.threadId = threadId;
  history.replaceState(null, "", "#thread=" + threadId);
  ui.title.textContent = thread.title;
  clearMessages();
  const active = thread.active_run;
  state.shownRun = 0;
  renderHistory(thread.messages, active, thread.last_error);
  if (active) {
    const asked = thread.messages.some((m) => m.id === active.human_id);
    if (!asked && active.message) addUser(active.message);
    attach(active.stream_url, addTurn());
  }
  markCurrent();
  refreshActions();
  scrollToLatest();
}

function newChat() {
  state.opening++;
  closeStream();
  closeDrawer();
  setStatus("");
  state.threadId = null;
  history.replaceState(null, "", location.pathname);
  ui.title.textContent = "New chat";
  clearMessages();
  markCurrent();
  ui.input.focus();
}

// --------------------------------------------------------------------------- thread list

function markCurrent() {
  for (const item of ui.threads.children) {
    item.classList.toggle("current", item.dataset.threadId === state.threadId);
  }
}

// The thread list is looked at again every few seconds while the page is visible, so that
// an answer started or ended in another tab or the terminal client shows here by itself. An
// unchanged list costs the server a 304 with no body (If-None-Match); a hidden page does not
// look until it is shown again. One look at a time: the next is set when the latest ends.
const LIST_EVERY_MS = 3000;

async function loadThreads() {
  clearTimeout(state.threadsTimer);
  const look = ++state.threadsLook;
  let response;
  let data = null; // null: unchanged
  try {
    response = await fetch("/v1/threads", {
      credentials: "same-origin",
      cache: "no-store", // the If-None-Match below is this page's own
      headers: state.threadsTag ? { "if-none-match": state.threadsTag } : {},
    });
    if (response.status !== 304) data = await readJson(response);
  } catch (error) {
    if (look !== state.threadsLook) return;
    setStatus(error.message, "warn", "threads");
    lookAgainLater(); // offline for a moment: the next look clears the line once it works
    return;
  }
  if (look !== state.threadsLook) return; // a later look has begun: it shows the list
  if (ui.status.dataset.source === "threads") setStatus(""); // its failure is over
  // Not while a thread is being renamed: the name being typed would go.
  if (data && !ui.threads.querySelector(".rename-input")) {
    state.threads = data.threads;
    state.threadsTag = response.headers.get("etag") || "";
    ui.threads.replaceChildren(...data.threads.map(threadItem));
    markCurrent();
  }
  const threads = data ? data.threads : state.threads;
  const current = threads.find((thread) => thread.thread_id === state.threadId);
  if (current && current.streaming) followAnswerElsewhere();
  lookAgainLater();
}

function lookAgainLater() {
  clearTimeout(state.threadsTimer);
  if (!document.hidden) state.threadsTimer = setTimeout(loadThreads, LIST_EVERY_MS);
}

// The open thread answers for another tab or the terminal client, and this page is idle
// (it learns that from the list, which it looks at every few seconds): show that
// answer streaming, with Stop. Not while the user edits the last question (it would go).
async function followAnswerElsewhere() {
  if (state.stream || state.sending || ui.messages.querySelector(".editor")) return;
  const thread = await readOpenThread(); // (failed: the next refresh looks again)
  if (!thread || state.stream || state.sending || ui.messages.querySelector(".editor")) return;
  if (thread.active_run && thread.active_run.run > state.shownRun) {
    openThread(state.threadId, { keepStatus: true });
  }
}

// The open thread, read again; null if the read failed or the page opened another (or
// the same one again) meanwhile.
async function readOpenThread() {
  const threadId = state.threadId;
  const opening = state.opening;
  let thread;
  try {
    thread = await api("GET", "/v1/thread?thread_id=" + encodeURIComponent(threadId));
  } catch {
    return null;
  }
  return threadId === state.threadId && opening === state.opening ? thread : null;
}

function threadItem(thread) {
  const item = element("div", "thread");
  item.dataset.threadId = thread.thread_id;
  const name = element("span", "name", thread.title);
  name.title = thread.title;
  if (thread.streaming) {
    const live = element("span", "live");
    live.title = "answering";
    item.classList.add("streaming");
    item.append(live);
  }
  const rename = element("button", "rename", "✎");
  rename.title = "Rename";
  const remove = element("button", "delete", "✕");
  remove.title = "Delete";
  item.append(name, rename, remove);
  item.addEventListener("click", (event) => {
    if (!event.target.closest("button, input")) openThread(thread.thread_id);
  });
  rename.addEventListener("click", () => startRename(item, thread));
  remove.addEventListener("click", () => deleteThread(thread));
  return item;
}

function startRename(item, thread) {
  const name = item.querySelector(".name");
  const input = element("input", "rename-input");
  input.value = thread.title;
  name.replaceWith(input);
  input.focus();
  input.select();
  const done = async (save) => {
    input.onblur = null;
    if (save && input.value.trim() && input.value !== thread.title) {
      try {
        const path = "/v1/thread?thread_id=" + thread.thread_id;
        const renamed = await api("PATCH", path, { chat_name: input.value });
        if (thread.thread_id === state.threadId) ui.title.textContent = renamed.title;
        name.textContent = name.title = renamed.title;
      } catch (error) {
        setStatus(error.message, "warn");
      }
    }
    input.replaceWith(name); // the list is not drawn again while a name is being typed
    loadThreads();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") done(true);
    if (event.key === "Escape") done(false);
  });
  input.onblur = () => done(true);
}

async function deleteThread(thread) {
  if (!confirm(`Delete "${thread.title}"?`)) return;
  try {
    await api("DELETE", "/v1/thread?thread_id=" + thread.thread_id);
  } catch (error) {
    setStatus(error.message, "warn");
  }
  if (thread.thread_id === state.threadId) newChat();
  loadThreads();
}

// --------------------------------------------------------------------------- drawer (phones)

function openDrawer() {
  document.body.classList.add("drawer-open");
  ui.backdrop.hidden = false;
  ui.menu.setAttribute("aria-expanded", "true");
  $("#new-chat").focus();
}

function closeDrawer() {
  if (!document.body.classList.contains("drawer-open")) return;
  const hadFocus = $("#sidebar").contains(document.activeElement);
  document.body.classList.remove("drawer-open");
  ui.backdrop.hidden = true;
  ui.menu.setAttribute("aria-expanded", "false");
  if (hadFocus) ui.menu.focus();
}

ui.menu.addEventListener("click", () => {
  if (document.body.classList.contains("drawer-open")) closeDrawer();
  else openDrawer();
});
ui.backdrop.addEventListener("click", closeDrawer);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeDrawer();
});

// --------------------------------------------------------------------------- start

async function loadInfo() {
  const info = await api("GET", "/info");
  const saved = localStorage.getItem("chat-model");
  ui.model.replaceChildren(
    ...info.models.map((option) => {
      const choice = element("option", "", option.spec);
      choice.value = option.spec;
      choice.disabled = !option.available;
      if (option.reason) choice.title = option.reason;
      return choice;
    }),
  );
  const usable = info.models.filter((m) => m.available).map((m) => m.spec);
  ui.model.value = usable.includes(saved) ? saved : info.default_model;
  ui.info.textContent =
    `streams: ${info.transport} · database: ${info.database} · busy: ${info.busy_policy}` +
    (info.worker_mode ? " · workers" : "");
}

document.querySelector("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send(ui.input.value, { fromInput: true });
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(ui.input.value, { fromInput: true });
  }
});
ui.stop.addEventListener("click", stopAnswer);
ui.model.addEventListener("change", () => localStorage.setItem("chat-model", ui.model.value));
$("#new-chat").addEventListener("click", newChat);
for (const hint of document.querySelectorAll(".hint")) {
  hint.addEventListener("click", () => send(hint.textContent));
}
document.addEventListener("visibilitychange", () => {
  if (document.hidden) clearTimeout(state.threadsTimer);
  else loadThreads();
});

if (matchMedia("(max-width: 760px)").matches) ui.input.placeholder = "Message";

// Ready once the page knows the models and shows the thread named in its URL. A message sent
// before that waits: sent at once, it would go without the model chosen here, and the thread
// opened afterwards would take its answer off the screen.
const ready = (async () => {
  try {
    await loadInfo();
  } catch (error) {
    setStatus(error.message, "warn");
  }
  await loadThreads();
  const match = location.hash.match(/thread=([A-Za-z0-9_-]{16,64})$/);
  if (match) await openThread(match[1]);
  else newChat();
})();

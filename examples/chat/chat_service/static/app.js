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
};
const state = { threadId: null, stream: null, info: null };

// --------------------------------------------------------------------------- HTTP

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.message || response.statusText);
    error.code = data.code;
    error.status = response.status;
    throw error;
  }
  return data;
}

function setStatus(text, kind) {
  ui.status.textContent = text || "";
  ui.status.className = kind || "";
}

// --------------------------------------------------------------------------- rendering

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function clearMessages() {
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
}

function addUser(text) {
  ui.empty.hidden = true;
  const message = element("div", "msg user");
  message.append(element("div", "bubble", text));
  ui.messages.append(message);
  scrollDown();
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
  const text = element("span", "text");
  const meta = element("div", "meta");
  bubble.append(tools, text);
  el.append(bubble, meta);
  ui.messages.append(el);
  scrollDown();
  return { el, tools, text, meta, segmentEnded: false };
}

function appendText(turn, text) {
  if (turn.segmentEnded && turn.text.textContent) text = "\n\n" + text.replace(/^\s+/, "");
  turn.segmentEnded = false;
  turn.text.textContent += text;
  scrollDown();
}

function addTool(turn, call, status) {
  const args = Object.entries(call.args || {})
    .map(([key, value]) => `${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join(", ");
  const tool = element("div", "tool", `${call.name}(${args})`);
  tool.dataset.state = status;
  tool.dataset.name = call.name;
  turn.tools.append(tool);
  scrollDown();
}

function toolsDone(turn) {
  for (const tool of turn.tools.querySelectorAll('.tool[data-state="running"]')) {
    tool.dataset.state = "done";
  }
}

function renderHistory(messages) {
  let turn = null;
  for (const message of messages) {
    if (message.role === "user") {
      addUser(message.text);
      turn = null;
    } else if (message.role === "summary") {
      addSummary("Earlier messages were summarized: " + message.text.replace(/^[^:]*:\s*/, ""));
    } else if (message.role === "assistant") {
      turn = turn || addTurn();
      turn.el.dataset.state = message.stopped ? "stopped" : "done";
      if (message.text) appendText(turn, message.text);
      turn.segmentEnded = true;
      for (const call of message.tool_calls) addTool(turn, call, "done");
      if (message.stopped) turn.meta.replaceChildren(element("span", "stopped-tag", "stopped"));
    }
  }
}

// --------------------------------------------------------------------------- streaming

function setStreaming(on) {
  ui.stop.hidden = !on;
  ui.send.disabled = on;
}

function closeStream() {
  if (state.stream) {
    state.stream.finished = true;
    state.stream.es.close();
    state.stream = null;
  }
  setStreaming(false);
}

function attach(url, turn) {
  closeStream();
  const es = new EventSource(url, { withCredentials: true });
  const stream = { es, turn, finished: false };
  state.stream = stream;
  turn.el.dataset.state = "streaming";
  setStreaming(true);

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
      if (state.threadId) openThread(state.threadId);
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
  turn.el.dataset.state = outcome;
  setStreaming(false);
  setStatus("");
  if (outcome === "stopped") turn.meta.append(element("span", "stopped-tag", "stopped"));
  if (outcome === "error") {
    const error = element("div", "error", message || "the answer failed");
    const retry = element("button", "retry", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => retryAnswer(turn));
    error.append(retry);
    turn.el.append(error);
  }
  loadThreads();
}

// --------------------------------------------------------------------------- actions

async function send(text) {
  text = text.trim();
  if (!text || state.stream) return;
  const body = { message: text, model: ui.model.value };
  if (state.threadId) body.thread_id = state.threadId;
  let started;
  try {
    started = await api("POST", "/v1/chat/message", body);
  } catch (error) {
    setStatus(error.message, "warn");
    return;
  }
  ui.input.value = "";
  if (state.threadId !== started.thread_id) {
    state.threadId = started.thread_id;
    history.replaceState(null, "", "#thread=" + started.thread_id);
    clearMessages();
    ui.title.textContent = text.length > 60 ? text.slice(0, 59) + "…" : text;
  }
  addUser(text);
  attach(started.stream_url, addTurn());
  loadThreads();
}

async function retryAnswer(turn) {
  try {
    const started = await api("POST", "/v1/chat/message", {
      thread_id: state.threadId,
      retry: true,
      model: ui.model.value,
    });
    turn.el.remove();
    attach(started.stream_url, addTurn());
  } catch (error) {
    setStatus(error.message, "warn");
  }
}

async function stopAnswer() {
  if (!state.threadId) return;
  try {
    await api("POST", "/v1/chat/stop?thread_id=" + encodeURIComponent(state.threadId));
  } catch (error) {
    setStatus(error.message, "warn");
  }
}

async function openThread(threadId) {
  closeStream();
  let thread;
  try {
    thread = await api("GET", "/v1/thread?thread_id=" + encodeURIComponent(threadId));
  } catch (error) {
    newChat();
    setStatus(error.status === 404 ? "That thread does not exist." : error.message, "warn");
    return;
  }
  state.threadId = threadId;
  history.replaceState(null, "", "#thread=" + threadId);
  ui.title.textContent = thread.title;
  clearMessages();
  renderHistory(thread.messages);
  const active = thread.active_run;
  if (active) {
    const asked = thread.messages.some((m) => m.id === active.human_id);
    if (!asked && active.message) addUser(active.message);
    attach(active.stream_url, addTurn());
  }
  markCurrent();
  scrollDown();
}

function newChat() {
  closeStream();
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

async function loadThreads() {
  let data;
  try {
    data = await api("GET", "/v1/threads");
  } catch (error) {
    setStatus(error.message, "warn");
    return;
  }
  ui.threads.replaceChildren(...data.threads.map(threadItem));
  markCurrent();
}

function threadItem(thread) {
  const item = element("div", "thread");
  item.dataset.threadId = thread.thread_id;
  const name = element("span", "name", thread.title);
  name.title = thread.title;
  const rename = element("button", "rename", "✎");
  rename.title = "Rename";
  const remove = element("button", "delete", "✕");
  remove.title = "Delete";
  item.append(name, rename, remove);
  item.addEventListener("click", (event) => {
    if (event.target === item || event.target === name) openThread(thread.thread_id);
  });
  rename.addEventListener("click", () => startRename(item, thread));
  remove.addEventListener("click", () => deleteThread(thread));
  return item;
}

function startRename(item, thread) {
  const input = element("input", "rename-input");
  input.value = thread.title;
  item.querySelector(".name").replaceWith(input);
  input.focus();
  input.select();
  const done = async (save) => {
    input.onblur = null;
    if (save && input.value.trim() && input.value !== thread.title) {
      try {
        await api("PATCH", "/v1/thread?thread_id=" + thread.thread_id, { chat_name: input.value });
        if (thread.thread_id === state.threadId) ui.title.textContent = input.value.trim();
      } catch (error) {
        setStatus(error.message, "warn");
      }
    }
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

// --------------------------------------------------------------------------- start

async function loadInfo() {
  const info = await api("GET", "/info");
  state.info = info;
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
  send(ui.input.value);
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    send(ui.input.value);
  }
});
ui.stop.addEventListener("click", stopAnswer);
ui.model.addEventListener("change", () => localStorage.setItem("chat-model", ui.model.value));
$("#new-chat").addEventListener("click", newChat);
for (const hint of document.querySelectorAll(".hint")) {
  hint.addEventListener("click", () => send(hint.textContent));
}

(async () => {
  await loadInfo();
  await loadThreads();
  const match = location.hash.match(/thread=([0-9a-f]{32})/);
  if (match) await openThread(match[1]);
  else newChat();
})();

// `useChat` from the real @ai-sdk/react against the reference chat service, rendered with
// React under jsdom, with a bearer token in the transport's `headers`:
// 1. mount with `resume: true` (nothing to resume yet), ask a question the offline model
//    answers with the calculator, and unmount (a page reload) once the tool's output is in
//    and the text has begun;
// 2. mount again with the stored user message and `resume: true`: the answer is replayed
//    from its start (tool call and output included) and followed to its end;
// 3. send a second message in the same chat.
// With a chat id argument the hook gets `id`; without one it uses the SDK's own generated id.
// Usage: node ai_sdk_service_tools.mjs <server> <token> <question> <question2> [chatId]
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { url: "http://localhost/" });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.navigator = dom.window.navigator;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

const { renderHook, waitFor, act } = await import("@testing-library/react");
const { useChat } = await import("@ai-sdk/react");
const { DefaultChatTransport } = await import("ai");

const [server, token, question, question2, explicitId] = process.argv.slice(2);
const timeout = { timeout: 60000 };
const resumes = [];
const recordingFetch = async (url, init) => {
  const response = await fetch(url, init);
  if ((init?.method ?? "GET") === "GET") resumes.push(response.status);
  return response;
};
const transport = new DefaultChatTransport({
  api: `${server}/api/chat`,
  headers: { Authorization: `Bearer ${token}` },
  fetch: recordingFetch,
});
const textOf = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const toolParts = (message) => message.parts.filter((p) => p.type.startsWith("tool-"));
const idOption = explicitId ? { id: explicitId } : {};
const failure = (hook) => hook.result.current.error?.message ?? null;

// 1. Mounted with resume on a new chat: nothing to resume (204), then the question.
const first = renderHook(() => useChat({ ...idOption, transport, resume: true }));
await waitFor(() => { if (resumes.length === 0) throw new Error("waiting"); }, timeout);
const chatId = first.result.current.id;
await act(() => { first.result.current.sendMessage({ text: question }); });
await waitFor(() => {
  if (failure(first)) return;
  const last = first.result.current.messages.at(-1);
  const done = last?.role === "assistant" && toolParts(last).some((p) => p.state === "output-available");
  if (!done || textOf(last) === "") throw new Error("waiting");
}, timeout);
const userMessage = first.result.current.messages[0];
const cut = first.result.current.messages.at(-1);
const firstError = failure(first);
first.unmount();

// 2. The reloaded page resumes the answer in progress: replayed from `start`, then live.
const second = renderHook(() =>
  useChat({ id: chatId, messages: [userMessage], transport, resume: true }),
);
await waitFor(() => {
  const { status, messages } = second.result.current;
  if (failure(second) || resumes[1] === 204) return; // the test reports what went wrong
  if (status !== "ready" || messages.at(-1)?.role !== "assistant") throw new Error("waiting");
}, timeout);
const resumed = second.result.current.messages.at(-1);

// 3. A second message in the same chat.
await act(() => { second.result.current.sendMessage({ text: question2 }); });
await waitFor(() => {
  const { status, messages } = second.result.current;
  if (failure(second)) return;
  if (status !== "ready" || messages.length < 4) throw new Error("waiting");
}, timeout);
const after = second.result.current.messages;
const secondError = failure(second);
second.unmount();

console.log(
  JSON.stringify({
    chatId,
    error: firstError ?? secondError,
    resumeStatuses: resumes,
    cutId: cut.id,
    cutTools: toolParts(cut),
    resumedId: resumed.id,
    resumedText: textOf(resumed),
    resumedTools: toolParts(resumed),
    roles: after.map((m) => m.role),
    secondText: textOf(after.at(-1)),
    secondTools: toolParts(after.at(-1)),
  }),
);
process.exit(0);

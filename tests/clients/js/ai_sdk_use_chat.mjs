// `useChat({resume: true})` from the real @ai-sdk/react, rendered with React under jsdom:
// send, unmount mid-answer (a page reload), mount again with the stored user message and
// resume on another server; then mount once more after the end (204: nothing to resume).
// Usage: node ai_sdk_use_chat.mjs <serverA> <serverB> <prompt>
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { url: "http://localhost/" });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.navigator = dom.window.navigator;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

const { renderHook, waitFor, act } = await import("@testing-library/react");
const { useChat } = await import("@ai-sdk/react");
const { DefaultChatTransport, generateId } = await import("ai");

const [serverA, serverB, prompt] = process.argv.slice(2);
const chatId = generateId();
const half = `${prompt}19 `;
const timeout = { timeout: 30000 };
const textOf = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const resumes = [];
const recordingFetch = async (url, init) => {
  const response = await fetch(url, init);
  if ((init?.method ?? "GET") === "GET") resumes.push(response.status);
  return response;
};
const transport = (server) =>
  new DefaultChatTransport({ api: `${server}/api/chat`, fetch: recordingFetch });

// 1. A page sends the message and is closed (unmounted) halfway through the answer.
const first = renderHook(() => useChat({ id: chatId, transport: transport(serverA) }));
await act(() => { first.result.current.sendMessage({ text: prompt }); });
await waitFor(() => {
  const last = first.result.current.messages.at(-1);
  if (last?.role !== "assistant" || !textOf(last).endsWith(half)) throw new Error("waiting");
}, timeout);
const userMessage = first.result.current.messages[0];
const cutMessage = first.result.current.messages[1];
first.unmount();

// 2. The reloaded page has the stored user message and resumes the answer in progress.
const second = renderHook(() =>
  useChat({ id: chatId, messages: [userMessage], transport: transport(serverB), resume: true }),
);
await waitFor(() => {
  const last = second.result.current.messages.at(-1);
  if (last?.role !== "assistant" || !textOf(last).endsWith(half)) throw new Error("waiting");
}, timeout);
await fetch(`${serverA}/test/release/${chatId}`, { method: "POST" });
await waitFor(() => {
  const { status, messages } = second.result.current;
  if (status !== "ready" || !textOf(messages.at(-1)).endsWith(`${prompt}39 `)) throw new Error("waiting");
}, timeout);
const resumed = second.result.current.messages;
second.unmount();

// 3. Reloaded after the end with the whole history: the resume finds nothing (204).
const before = resumes.length;
const third = renderHook(() =>
  useChat({ id: chatId, messages: resumed, transport: transport(serverB), resume: true }),
);
await waitFor(() => { if (resumes.length === before) throw new Error("waiting"); }, timeout);
await waitFor(() => { if (third.result.current.status !== "ready") throw new Error("waiting"); }, timeout);
const after = third.result.current.messages;
third.unmount();

console.log(
  JSON.stringify({
    cutId: cutMessage.id,
    cutText: textOf(cutMessage),
    roles: resumed.map((m) => m.role),
    id: resumed[1].id,
    text: textOf(resumed[1]),
    parts: resumed[1].parts,
    resumeStatuses: resumes,
    afterRoles: after.map((m) => m.role),
    afterText: textOf(after.at(-1)),
    error: third.result.current.error?.message ?? second.result.current.error?.message ?? null,
  }),
);
process.exit(0);

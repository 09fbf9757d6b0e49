// `useStream({reconnectOnMount: true})` from the real @langchain/langgraph-sdk/react under
// jsdom: submit, unmount mid-answer (a page reload), mount again on another server: it
// rejoins the run from sessionStorage and replays it ("-1"), then follows it to the end.
// Usage: node langgraph_use_stream.mjs <serverA> <serverB> <prompt>
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { url: "http://localhost/" });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.navigator = dom.window.navigator;
globalThis.sessionStorage = dom.window.sessionStorage;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

const { renderHook, waitFor, act } = await import("@testing-library/react");
const { useStream } = await import("@langchain/langgraph-sdk/react");
const { Client } = await import("@langchain/langgraph-sdk");

const [serverA, serverB, prompt] = process.argv.slice(2);
const timeout = { timeout: 30000 };
const threadId = (await new Client({ apiUrl: `${serverA}/langgraph` }).threads.create()).thread_id;
const textOf = (message) =>
  typeof message?.content === "string" ? message.content : JSON.stringify(message?.content);
const mount = (server) =>
  renderHook(() => {
    const stream = useStream({
      apiUrl: `${server}/langgraph`,
      assistantId: "agent",
      threadId,
      reconnectOnMount: true,
    });
    void stream.messages; // asks for messages-tuple + values, as a UI rendering them does
    return stream;
  });
const lastText = (hook) => textOf(hook.result.current.messages.at(-1));

// 1. Submit, and reload the page halfway through the answer.
const first = mount(serverA);
await waitFor(() => { if (first.result.current.isThreadLoading) throw new Error("waiting"); }, timeout);
await act(() => { first.result.current.submit({ messages: [{ type: "human", content: prompt }] }); });
await waitFor(() => { if (!lastText(first).endsWith(`${prompt}19 `)) throw new Error("waiting"); }, timeout);
const storedRun = window.sessionStorage.getItem(`lg:stream:${threadId}`);
first.unmount();

// 2. The reloaded page (another server) rejoins the run by itself.
const second = mount(serverB);
await waitFor(() => { if (!lastText(second).endsWith(`${prompt}19 `)) throw new Error("waiting"); }, timeout);
await fetch(`${serverA}/test/release/${threadId}`, { method: "POST" });
await waitFor(() => {
  const { isLoading } = second.result.current;
  if (isLoading || !lastText(second).endsWith(`${prompt}39 `)) throw new Error("waiting");
}, timeout);
const messages = second.result.current.messages;
const error = second.result.current.error;
second.unmount();

console.log(
  JSON.stringify({
    storedRun,
    types: messages.map((m) => m.type),
    text: textOf(messages.at(-1)),
    error: error ? String(error) : null,
    storedAfter: window.sessionStorage.getItem(`lg:stream:${threadId}`),
  }),
);
process.exit(0);

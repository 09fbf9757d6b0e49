// `useStream` from the real @langchain/langgraph-sdk/react under jsdom, with a UI that
// reads `toolProgress` and sets `onToolEvent` (each asks the server for the "tools"
// stream mode): submit a question the agent answers with a tool, and record each tool
// event and each tool progress state rendered, and the artifact of each tool message.
// Prints one JSON line of what it saw.
// Usage: node langgraph_tool_progress.mjs <service> <token> <prompt>
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { url: "http://localhost/" });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.navigator = dom.window.navigator;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

const { renderHook, waitFor, act } = await import("@testing-library/react");
const { useStream } = await import("@langchain/langgraph-sdk/react");

const [service, token, prompt] = process.argv.slice(2);
const timeout = { timeout: 30000 };
const states = [];
const events = [];
const hook = renderHook(() => {
  const stream = useStream({
    apiUrl: `${service}/langgraph`,
    assistantId: "agent",
    defaultHeaders: { Authorization: `Bearer ${token}` },
    onToolEvent: (data) => { events.push([data.event, data.name]); },
  });
  for (const tool of stream.toolProgress) {
    const last = states.at(-1);
    const seen = { name: tool.name, state: tool.state, toolCallId: tool.toolCallId };
    if (JSON.stringify(last) !== JSON.stringify(seen)) states.push(seen);
  }
  void stream.messages;
  return stream;
});
await act(() => { hook.result.current.submit({ messages: [{ type: "human", content: prompt }] }); });
await waitFor(() => {
  const { isLoading, messages } = hook.result.current;
  if (isLoading || messages.at(-1)?.type !== "ai" || !messages.at(-1).content) {
    throw new Error("waiting");
  }
}, timeout);
const messages = hook.result.current.messages;
const error = hook.result.current.error;
hook.unmount();
console.log(
  JSON.stringify({
    artifacts: messages.filter((m) => m.type === "tool").map((m) => m.artifact ?? null),
    error: error ? String(error) : null,
    events,
    states,
    toolCallIds: messages.flatMap((m) => (m.tool_calls ?? []).map((c) => c.id)),
    types: messages.map((m) => m.type),
  }),
);
process.exit(0);

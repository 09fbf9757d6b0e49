// An answer that ends with the output of a tool the server ran (no text after it), read by
// the real `ai` Chat with `sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls`:
// the client has nothing to add, so it must not post the message back (the server would
// answer "continued", and a source that answers the same way again would be posted forever).
// Usage: node ai_sdk_server_tool_end.mjs <server> <prompt>
import { Chat } from "@ai-sdk/react";
import { DefaultChatTransport, generateId, lastAssistantMessageIsCompleteWithToolCalls } from "ai";

const [server, prompt] = process.argv.slice(2);
const posts = [];
const recordingFetch = async (url, init) => {
  if (init?.method === "POST") posts.push(JSON.parse(init.body));
  return fetch(url, init);
};
const chat = new Chat({
  id: generateId(),
  transport: new DefaultChatTransport({ api: `${server}/api/direct`, fetch: recordingFetch }),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
});
// Resolves once the answer, and any message the client posts after it on its own, is read.
await chat.sendMessage({ text: prompt });
const last = chat.messages.at(-1);
console.log(
  JSON.stringify({
    postedRoles: posts.map((p) => p.messages.map((m) => m.role)),
    parts: last.parts.map((p) => ({ type: p.type, state: p.state ?? null, text: p.text ?? null })),
    status: chat.status,
    error: chat.error?.message ?? null,
  }),
);
process.exit(0);

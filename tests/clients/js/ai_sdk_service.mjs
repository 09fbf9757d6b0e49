// useChat's transport against the reference chat service, with a bearer token in
// `headers`: answer a message on a service thread (chat id = thread id), resume after the
// end (204: null), then stop an answer in flight through the service's stop endpoint.
// Usage: node ai_sdk_service.mjs <server> <token> <threadId> <otherThreadId>
import { DefaultChatTransport, generateId, readUIMessageStream } from "ai";

const [server, token, threadId, otherThreadId] = process.argv.slice(2);
const headers = { Authorization: `Bearer ${token}` };
const transport = new DefaultChatTransport({ api: `${server}/api/chat`, headers });
const user = (text) => ({ id: generateId(), role: "user", parts: [{ type: "text", text }] });
const textOf = (m) => m.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

const stream = await transport.sendMessages({
  chatId: threadId,
  messages: [user("hello there")],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
});
let answer;
for await (const message of readUIMessageStream({ stream, terminateOnError: true })) answer = message;
const resumedAfterEnd = await transport.reconnectToStream({ chatId: threadId });

// Stop: read until the first words, ask the service to stop, read what is left.
const types = [];
let stopStatus = null;
const second = await transport.sendMessages({
  chatId: otherThreadId,
  messages: [user("tell me a long story")],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
});
for await (const chunk of second) {
  types.push(chunk.type);
  if (stopStatus === null && chunk.type === "text-delta") {
    stopStatus = (await fetch(`${server}/api/chat/${otherThreadId}/stop`, { method: "POST", headers })).status;
  }
}
console.log(JSON.stringify({ text: textOf(answer), resumedAfterEnd, stopStatus, lastTypes: types.slice(-2) }));

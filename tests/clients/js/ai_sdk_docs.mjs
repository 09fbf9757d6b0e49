// The docs' AI SDK backend, driven by the real client: send one message, read the whole
// answer, then resume (nothing in progress: null). Usage: node ai_sdk_docs.mjs <server>
import { DefaultChatTransport, generateId, readUIMessageStream } from "ai";

const [server] = process.argv.slice(2);
const transport = new DefaultChatTransport({ api: `${server}/api/chat` });
const chatId = generateId();
const stream = await transport.sendMessages({
  chatId,
  messages: [{ id: generateId(), role: "user", parts: [{ type: "text", text: "hello docs" }] }],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
});
let last;
for await (const message of readUIMessageStream({ stream, terminateOnError: true })) last = message;
const text = last.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
console.log(JSON.stringify({ text, resumed: await transport.reconnectToStream({ chatId }) }));

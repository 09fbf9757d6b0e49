// Drive our AI SDK chat router with the real `ai` client: DefaultChatTransport's
// sendMessages (cut mid-answer), reconnectToStream on another server (mid-answer and after
// the end), each read with readUIMessageStream. Prints one JSON line of what it saw.
// Usage: node ai_sdk_transport.mjs <serverA> <serverB> <prompt>
import { DefaultChatTransport, generateId, readUIMessageStream } from "ai";

const [serverA, serverB, prompt] = process.argv.slice(2);
const chatId = generateId(); // the SDK's own 16-character id, as useChat sends without `id`
const userMessage = { id: generateId(), role: "user", parts: [{ type: "text", text: prompt }] };
const textOf = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

async function readUntil(stream, done) {
  let last;
  for await (const message of readUIMessageStream({ stream, terminateOnError: true })) {
    last = message;
    if (done(message)) break;
  }
  return last;
}

const transportA = new DefaultChatTransport({ api: `${serverA}/api/chat` });
const transportB = new DefaultChatTransport({ api: `${serverB}/api/chat` });

// 1. Send; read until the answer holds halfway, then walk away (the fetch is aborted).
const abort = new AbortController();
const first = await transportA.sendMessages({
  chatId,
  messages: [userMessage],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: abort.signal,
});
const half = `${prompt}19 `;
const cut = await readUntil(first, (m) => textOf(m).endsWith(half));
abort.abort();

// 2. Resume on the other server: a replay from `start`, then live once released.
const resumed = await transportB.reconnectToStream({ chatId });
if (resumed === null) throw new Error("reconnectToStream answered 204 mid-answer");
let released = false;
let snapshots = 0;
const whole = await readUntil(resumed, (m) => {
  snapshots += 1;
  if (!released && textOf(m).endsWith(half)) {
    released = true;
    // Not awaited here: the stream goes on while the release request is in flight.
    fetch(`${serverA}/test/release/${chatId}`, { method: "POST" });
  }
  return false;
});

// 3. After the end there is nothing to resume: 204, which the SDK returns as null.
const after = await transportB.reconnectToStream({ chatId });

// 4. Stop (the app's endpoint; useChat's stop() only aborts the fetch) from the other server:
// the answer in flight ends with `abort`.
const stopChatId = generateId();
const chunks = [];
const stopped = await transportA.sendMessages({
  chatId: stopChatId,
  messages: [userMessage],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: undefined,
});
let stopStatus = null;
let stopText = "";
for await (const chunk of stopped) {
  chunks.push(chunk.type);
  if (chunk.type === "text-delta") stopText += chunk.delta;
  if (stopStatus === null && stopText.endsWith(half)) {
    stopStatus = (await fetch(`${serverB}/api/chat/${stopChatId}/stop`, { method: "POST" })).status;
  }
}

console.log(
  JSON.stringify({
    stopStatus,
    stopText,
    stopLast: chunks.slice(-2),
    chatId,
    cutId: cut.id,
    cutText: textOf(cut),
    id: whole.id,
    text: textOf(whole),
    parts: whole.parts,
    snapshots,
    afterEnd: after,
  }),
);

// Message metadata (ChatRouter's message_metadata hook) as the real `ai` Chat keeps it in
// message.metadata: after a whole answer, halfway through one, and after that answer is
// resumed on another server (a replay from its `start`) and ends there.
// Usage: node ai_sdk_metadata.mjs <serverA> <serverB> <prompt>
import { Chat } from "@ai-sdk/react";
import { DefaultChatTransport, generateId } from "ai";

const [serverA, serverB, prompt] = process.argv.slice(2);
const half = `${prompt}19 `;
const transport = (server) => new DefaultChatTransport({ api: `${server}/api/meta` });
const textOf = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const release = (chatId) => fetch(`${serverA}/test/release/${chatId}`, { method: "POST" });
const shown = (message) =>
  message && { id: message.id, text: textOf(message), metadata: message.metadata ?? null };

// Polls the chat's state (a condition, with a deadline), as testing-library's waitFor does.
async function until(check) {
  const deadline = Date.now() + 30000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
const answering = (chat) => {
  const last = chat.messages.at(-1);
  return last?.role === "assistant" && textOf(last).endsWith(half);
};

// 1. A whole answer (released before it is sent: it does not hold).
const wholeId = generateId();
await release(wholeId);
const whole = new Chat({ id: wholeId, transport: transport(serverA) });
await whole.sendMessage({ text: prompt });

// 2. Halfway through an answer, the page goes away (its fetch is aborted)...
const cutId = generateId();
const first = new Chat({ id: cutId, transport: transport(serverA) });
const sent = first.sendMessage({ text: prompt });
await until(() => answering(first));
const cut = shown(first.messages.at(-1));
await first.stop();
await sent;

// 3. ...and the reloaded page resumes it on the other server, where it ends.
const second = new Chat({ id: cutId, messages: [first.messages[0]], transport: transport(serverB) });
const resuming = second.resumeStream();
await until(() => answering(second));
await release(cutId);
await resuming;

console.log(
  JSON.stringify({
    whole: shown(whole.messages.at(-1)),
    wholeStatus: whole.status,
    cut,
    resumed: shown(second.messages.at(-1)),
    resumedRoles: second.messages.map((m) => m.role),
    error: whole.error?.message ?? second.error?.message ?? null,
  }),
);
process.exit(0);

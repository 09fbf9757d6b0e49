// A client-side tool with the real `ai` Chat (@ai-sdk/react's, used without React):
// 1. send; the answer is a call of the client tool `confirm`, which onToolCall answers with
//    addToolOutput; `sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls`
//    then posts again with that assistant message last (a continuation), whose answer holds
//    halfway;
// 2. a reloaded page, holding the messages that continuation posted, resumes the answer in
//    progress (GET .../stream) on the other server; once it has caught up, the answer is
//    released and both chats read it to its end;
// 3. reloaded after the end: nothing to resume (204).
// Usage: node ai_sdk_client_tool.mjs <serverA> <serverB> <prompt>
import { Chat } from "@ai-sdk/react";
import { DefaultChatTransport, generateId, lastAssistantMessageIsCompleteWithToolCalls } from "ai";

const [serverA, serverB, prompt] = process.argv.slice(2);
const chatId = generateId();
const half = `${prompt}19 `;
const whole = `${prompt}39 `;
const posts = [];
const resumes = [];
const recordingFetch = async (url, init) => {
  const response = await fetch(url, init);
  if ((init?.method ?? "GET") === "GET") resumes.push(response.status);
  else if (String(url).endsWith("/api/tools")) posts.push(JSON.parse(init.body));
  return response;
};
const transport = (server) =>
  new DefaultChatTransport({ api: `${server}/api/tools`, fetch: recordingFetch });
const textOf = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const summary = (chat) =>
  chat.messages.map((m) => ({
    id: m.id,
    role: m.role,
    text: textOf(m),
    tools: m.parts.filter((p) => p.type === "tool-confirm").map((p) => p.state),
  }));

// Resolves when `done()` holds, checked at each change of the chat's messages or status.
function until(chat, done, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`timed out waiting for ${what}: ${JSON.stringify(summary(chat))}`));
    }, 30000);
    const check = () => {
      if (chat.error) {
        stop();
        reject(chat.error);
      } else if (done()) {
        stop();
        resolve();
      }
    };
    const offMessages = chat["~registerMessagesCallback"](check);
    const offStatus = chat["~registerStatusCallback"](check);
    const stop = () => { clearTimeout(timer); offMessages(); offStatus(); };
    check();
  });
}

// 1. The live page: the tool call, the tool's output, the continuation (held halfway).
const live = new Chat({
  id: chatId,
  transport: transport(serverA),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
  onToolCall: ({ toolCall }) => {
    // Not awaited (the AI SDK's advice: it would wait for the stream that calls this).
    live.addToolOutput({
      tool: "confirm",
      toolCallId: toolCall.toolCallId,
      output: `confirmed ${toolCall.input.q}`,
    });
  },
});
const sent = live.sendMessage({ text: prompt });
await until(live, () => posts.length === 2 && textOf(live.messages.at(-1)).endsWith(half), "the continuation");
const liveHalf = summary(live);

// 2. A reloaded page with the messages the continuation posted resumes the answer.
const reloaded = new Chat({ id: chatId, messages: posts[1].messages, transport: transport(serverB) });
const resumed = reloaded.resumeStream();
await until(reloaded, () => reloaded.messages.some((m) => textOf(m).endsWith(half)), "the replay");
const reloadedHalf = summary(reloaded);
await fetch(`${serverA}/test/release/${chatId}`, { method: "POST" });
await Promise.all([sent, resumed]);
await until(live, () => live.status === "ready" && textOf(live.messages.at(-1)).endsWith(whole), "the live end");
await until(reloaded, () => reloaded.status === "ready" && textOf(reloaded.messages.at(-1)).endsWith(whole), "the resumed end");

// 3. Reloaded after the end, with the whole history: nothing to resume.
const after = new Chat({ id: chatId, messages: live.messages, transport: transport(serverB) });
await after.resumeStream();

console.log(
  JSON.stringify({
    continuedId: posts[1].messages.at(-1).id,
    continuedRole: posts[1].messages.at(-1).role,
    postedRoles: posts.map((p) => p.messages.map((m) => m.role)),
    liveHalf,
    live: summary(live),
    reloadedHalf,
    reloaded: summary(reloaded),
    after: summary(after),
    resumeStatuses: resumes,
    error: live.error?.message ?? reloaded.error?.message ?? after.error?.message ?? null,
  }),
);
process.exit(0);

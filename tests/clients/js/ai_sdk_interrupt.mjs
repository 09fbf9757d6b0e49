// A LangGraph tool that asks the user (interrupt()), with the real `ai` Chat: the question
// shows as a data-interrupt part, and the user answers it either way docs/ai-sdk.md shows:
// - "tool": addToolOutput on the paused call; sendAutomaticallyWhen posts a continuation;
// - "message": a new message with the answer as its text.
// Then a reloaded page, holding the messages the last post sent (the stored history),
// replays the answer's run from its start (/test/replay: the resume of a run in progress).
// Usage: node ai_sdk_interrupt.mjs <server> <tool|message>
import { Chat } from "@ai-sdk/react";
import { DefaultChatTransport, generateId, lastAssistantMessageIsCompleteWithToolCalls } from "ai";

const [server, how] = process.argv.slice(2);
const posts = [];
const recordingFetch = async (url, init) => {
  if (init?.method === "POST") posts.push(JSON.parse(init.body));
  return fetch(url, init);
};
const finishes = [];
const chat = new Chat({
  id: generateId(),
  transport: new DefaultChatTransport({ api: `${server}/api/ask`, fetch: recordingFetch }),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
  onFinish: ({ finishReason }) => finishes.push(finishReason ?? null),
});
const shown = (of = chat) =>
  of.messages.map((m) => ({
    role: m.role,
    parts: m.parts
      .filter((p) => p.type !== "step-start")
      .map((p) => [p.type, p.state ?? null, p.text ?? p.output ?? p.data?.value ?? null]),
  }));
await chat.sendMessage({ text: "book x" });
const asked = shown();
if (how === "tool") {
  const call = chat.messages.at(-1).parts.find((p) => p.type === "tool-book");
  await chat.addToolOutput({ tool: "book", toolCallId: call.toolCallId, output: "yes" });
  // Then the continuation it posts is read (checked at each change of the chat's status).
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no continuation read")), 30000);
    const check = () => {
      if (posts.length === 2 && (chat.status === "ready" || chat.status === "error")) {
        clearTimeout(timer);
        off();
        resolve();
      }
    };
    const off = chat["~registerStatusCallback"](check);
    check();
  });
} else {
  await chat.sendMessage({ text: "yes" });
}
const answered = shown();
const reloaded = new Chat({
  id: chat.id,
  messages: posts.at(-1).messages,
  transport: new DefaultChatTransport({
    api: `${server}/api/ask`,
    prepareReconnectToStreamRequest: ({ id }) => ({ api: `${server}/test/replay/${id}` }),
  }),
});
await reloaded.resumeStream();
console.log(
  JSON.stringify({
    asked,
    answered,
    reloaded: shown(reloaded),
    reloadError: reloaded.error?.message ?? null,
    postedRoles: posts.map((p) => p.messages.map((m) => m.role)),
    finishes,
    status: chat.status,
    error: chat.error?.message ?? null,
  }),
);
process.exit(0);

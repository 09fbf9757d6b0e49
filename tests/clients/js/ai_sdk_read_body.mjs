// A UI message stream body our encoder wrote (a file), answered to the real `ai` Chat as the
// response of a POST: prints what the chat shows once it has read it (its status, error,
// the answer's parts) and whether it posted the answer back on its own.
// Usage: node ai_sdk_read_body.mjs <body file>
import { readFileSync } from "node:fs";
import { Chat } from "@ai-sdk/react";
import { DefaultChatTransport, lastAssistantMessageIsCompleteWithToolCalls } from "ai";

const [file] = process.argv.slice(2);
const body = readFileSync(file);
let posts = 0;
const answer = async () => {
  posts += 1;
  if (posts > 1) return new Response(null, { status: 500 }); // posted back: counted, not read
  return new Response(body, {
    headers: { "content-type": "text/event-stream", "x-vercel-ai-ui-message-stream": "v1" },
  });
};
let finished = null;
const chat = new Chat({
  id: "chat-1",
  transport: new DefaultChatTransport({ api: "http://test/api/chat", fetch: answer }),
  sendAutomaticallyWhen: lastAssistantMessageIsCompleteWithToolCalls,
  onFinish: ({ isAbort, isError, finishReason }) => {
    finished ??= { isAbort, isError, finishReason: finishReason ?? null };
  },
  onError: () => {},
});
await chat.sendMessage({ text: "hi" });
const last = chat.messages.at(-1);
console.log(
  JSON.stringify({
    status: chat.status,
    error: chat.error?.message ?? null,
    finished,
    posts,
    role: last.role,
    parts: last.parts.map((p) => ({
      type: p.type,
      state: p.state ?? null,
      text: p.text ?? null,
      input: p.input ?? null,
      output: p.output ?? null,
      errorText: p.errorText ?? null,
      data: p.data ?? null,
    })),
  }),
);
process.exit(0);

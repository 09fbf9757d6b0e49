// Drive our LangGraph API with the real @langchain/langgraph-sdk Client: runs.stream cut
// mid-answer, joinStream on another server with the last event id, a "-1" replay, cancel.
// Prints one JSON line of what it saw.
// Usage: node langgraph_sdk.mjs <serverA> <serverB> <prompt>
import { Client } from "@langchain/langgraph-sdk";

const [serverA, serverB, prompt] = process.argv.slice(2);
const clientA = new Client({ apiUrl: `${serverA}/langgraph` });
const clientB = new Client({ apiUrl: `${serverB}/langgraph` });
const modes = ["values", "messages-tuple", "custom"];
const textOf = (parts) =>
  parts
    .filter((p) => p.event === "messages" && p.data[0].type === "AIMessageChunk")
    .map((p) => p.data[0].content)
    .join("");
const release = (threadId) => fetch(`${serverA}/test/release/${threadId}`, { method: "POST" });

async function streamUntilHeld(client, threadId, input) {
  const controller = new AbortController();
  let runId;
  const parts = [];
  for await (const part of client.runs.stream(threadId, "agent", {
    input,
    streamMode: modes,
    signal: controller.signal,
    onRunCreated: (meta) => { runId = meta.run_id; },
  })) {
    parts.push(part);
    if (textOf(parts).endsWith(`${prompt}19 `)) break; // walk away mid-answer
  }
  controller.abort();
  return { runId, parts };
}

// 1. Cut mid-answer, then join on the other server after the last id we saw.
const thread = await clientA.threads.create();
const threadId = thread.thread_id;
const cut = await streamUntilHeld(clientA, threadId, {
  messages: [{ type: "human", content: prompt }],
});
const statusMid = (await clientB.runs.get(threadId, cut.runId)).status;
await release(threadId);
const rest = [];
for await (const part of clientB.runs.joinStream(threadId, cut.runId, {
  lastEventId: cut.parts.at(-1).id,
  streamMode: modes,
})) rest.push(part);

// 2. Replay the whole run from its start.
const replay = [];
for await (const part of clientB.runs.joinStream(threadId, cut.runId, { lastEventId: "-1" })) {
  replay.push(part);
}
const state = await clientB.threads.getState(threadId);
const statusEnd = (await clientB.runs.get(threadId, cut.runId)).status;
// The thread's checkpoints, newest first, then those before the newest (`before` a Config).
const historyIds = (await clientB.threads.getHistory(threadId, { limit: 20 })).map(
  (s) => s.checkpoint.checkpoint_id,
);
const olderIds = (
  await clientB.threads.getHistory(threadId, {
    limit: 20,
    before: { configurable: { checkpoint_id: historyIds[0] } },
  })
).map((s) => s.checkpoint.checkpoint_id);

// 3. A second thread: cut, then cancel from the other server.
const other = (await clientA.threads.create()).thread_id;
const held = await streamUntilHeld(clientA, other, {
  messages: [{ role: "user", content: prompt }],
});
await clientB.runs.cancel(other, held.runId, true);
const statusCancelled = (await clientB.runs.get(other, held.runId)).status;

console.log(
  JSON.stringify({
    firstEvent: cut.parts[0].event,
    firstData: cut.parts[0].data,
    runId: cut.runId,
    statusMid,
    cutText: textOf(cut.parts),
    restText: textOf(rest),
    lastEvent: rest.at(-1)?.event ?? null,
    replayText: textOf(replay),
    replayIds: replay.slice(0, cut.parts.length).map((p) => p.id),
    cutIds: cut.parts.map((p) => p.id),
    custom: cut.parts.filter((p) => p.event === "custom").map((p) => p.data),
    stateTypes: state.values.messages.map((m) => m.type),
    stateText: state.values.messages.at(-1).content,
    statusEnd,
    historyIds,
    olderIds,
    statusCancelled,
  }),
);

// Drive our LangGraph API with the real @langchain/langgraph-sdk Client as useStream's
// submit queue does (ui/orchestrator.ts): while a run streams (held mid-answer) on one
// server, runs.create with multitaskStrategy "enqueue" reaches the other; once the first
// run ends, joinStream("-1") follows the queued run from its first part to its end.
// runs.list, on the server that queued the run, names both runs while they wait and run.
// Prints one JSON line of what it saw.
// Usage: node langgraph_enqueue.mjs <serverA> <serverB> <prompt>
import { Client } from "@langchain/langgraph-sdk";

const [serverA, serverB, prompt] = process.argv.slice(2);
const clientA = new Client({ apiUrl: `${serverA}/langgraph` });
const clientB = new Client({ apiUrl: `${serverB}/langgraph` });
const release = (server, threadId) =>
  fetch(`${server}/test/release/${threadId}`, { method: "POST" });
const aiText = (parts) =>
  parts
    .filter((p) => p.event === "messages" && p.data[0].type === "AIMessageChunk")
    .map((p) => p.data[0].content)
    .join("");

const threadId = (await clientA.threads.create()).thread_id;
let held;
const reached = new Promise((resolve) => { held = resolve; });
const firstParts = [];
const first = (async () => {
  for await (const part of clientA.runs.stream(threadId, "agent", {
    input: { messages: [{ type: "human", content: prompt }] },
    streamMode: ["values", "messages-tuple"],
  })) {
    firstParts.push(part);
    if (aiText(firstParts).endsWith(`${prompt}19 `)) held();
  }
})();
await reached; // the first run is held mid-answer

const queued = await clientB.runs.create(threadId, "agent", {
  input: { messages: [{ type: "human", content: `${prompt}2` }] },
  multitaskStrategy: "enqueue",
  streamResumable: true,
});
const statusQueued = (await clientA.runs.get(threadId, queued.run_id)).status;
const listedQueued = await clientB.runs.list(threadId, { select: ["run_id", "status"] });
await release(serverA, threadId);
await release(serverB, threadId); // the queued run holds halfway too, where it runs
await first;
const joined = [];
for await (const part of clientA.runs.joinStream(threadId, queued.run_id, { lastEventId: "-1" })) {
  joined.push(part);
}
const state = await clientB.threads.getState(threadId);
console.log(
  JSON.stringify({
    created: { status: queued.status, strategy: queued.multitask_strategy },
    createdAt: queued.created_at,
    statusQueued,
    firstEnd: firstParts.at(-1),
    joinedFirst: joined[0],
    joinedEnd: joined.at(-1),
    joinedLast: joined.filter((p) => p.event === "values").at(-1)?.data.messages.at(-1).content,
    statusAfter: (await clientB.runs.get(threadId, queued.run_id)).status,
    queuedId: queued.run_id,
    listedQueued,
    listedAfter: (await clientA.runs.list(threadId)).map((r) => [r.run_id, r.status]),
    stateTypes: state.values.messages.map((m) => m.type),
    stateText: state.values.messages.at(-1).content,
  }),
);

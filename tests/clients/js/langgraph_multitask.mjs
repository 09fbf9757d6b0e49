// Drive our LangGraph API with the real @langchain/langgraph-sdk Client: a run streams
// (held mid-answer) on one server when runs.stream with multitaskStrategy "interrupt"
// reaches the other: the first run ends interrupted, the second runs to its end.
// Prints one JSON line of what it saw.
// Usage: node langgraph_multitask.mjs <serverA> <serverB> <prompt>
import { Client } from "@langchain/langgraph-sdk";

const [serverA, serverB, prompt] = process.argv.slice(2);
const clientA = new Client({ apiUrl: `${serverA}/langgraph` });
const clientB = new Client({ apiUrl: `${serverB}/langgraph` });
const modes = ["values", "messages-tuple"];
const textOf = (parts) =>
  parts
    .filter((p) => p.event === "messages" && p.data[0].type === "AIMessageChunk")
    .map((p) => p.data[0].content)
    .join("");
const release = (server, threadId) =>
  fetch(`${server}/test/release/${threadId}`, { method: "POST" });

const threadId = (await clientA.threads.create()).thread_id;
let held;
const reached = new Promise((resolve) => { held = resolve; });
let firstRunId;
const firstParts = [];
const first = (async () => {
  for await (const part of clientA.runs.stream(threadId, "agent", {
    input: { messages: [{ type: "human", content: prompt }] },
    streamMode: modes,
    onRunCreated: (meta) => { firstRunId = meta.run_id; },
  })) {
    firstParts.push(part);
    if (textOf(firstParts).endsWith(`${prompt}19 `)) held();
  }
})();
await reached; // the first run is held mid-answer

let secondRunId;
const secondParts = [];
const second = (async () => {
  for await (const part of clientB.runs.stream(threadId, "agent", {
    input: { messages: [{ type: "human", content: `${prompt}2` }] },
    streamMode: modes,
    multitaskStrategy: "interrupt",
    onRunCreated: (meta) => { secondRunId = meta.run_id; },
  })) secondParts.push(part);
})();
await first; // cancelled by the second run's request
await release(serverB, threadId); // the second run holds halfway too
await second;

const state = await clientB.threads.getState(threadId);
console.log(
  JSON.stringify({
    firstEnd: firstParts.at(-1),
    secondEnd: secondParts.at(-1),
    secondText: textOf(secondParts),
    secondStatus: (await clientA.runs.get(threadId, secondRunId)).status,
    distinct: firstRunId !== secondRunId,
    stateTypes: state.values.messages.map((m) => m.type),
    stateText: state.values.messages.at(-1).content,
  }),
);

// Drive threads.updateState and threads.delete of our LangGraph API with the real
// @langchain/langgraph-sdk Client: a run on a new thread, a state update as a node, one
// at the run's first checkpoint (checkpointId), then the thread deleted from the other
// server. Prints one JSON line of what it saw.
// Usage: node langgraph_thread_write.mjs <serverA> <serverB> <prompt>
import { Client } from "@langchain/langgraph-sdk";

const [serverA, serverB, prompt] = process.argv.slice(2);
const clientA = new Client({ apiUrl: `${serverA}/langgraph` });
const clientB = new Client({ apiUrl: `${serverB}/langgraph` });

const threadId = (await clientA.threads.create()).thread_id;
await fetch(`${serverA}/test/release/${threadId}`, { method: "POST" });
await clientA.runs.wait(threadId, "agent", {
  input: { messages: [{ type: "human", content: prompt }] },
});
const history = await clientB.threads.getHistory(threadId, { limit: 100 });
const first = history[history.length - 1].checkpoint;
const updated = await clientB.threads.updateState(threadId, {
  values: { messages: [{ type: "human", content: "edited" }] },
  asNode: "agent",
});
const state = await clientA.threads.getState(threadId);
const forked = await clientA.threads.updateState(threadId, {
  values: { messages: [{ type: "human", content: "again" }] },
  checkpointId: first.checkpoint_id,
});
const forkedState = await clientB.threads.getState(threadId);
const deleted = await clientB.threads.delete(threadId);
const after = await clientA.threads.getState(threadId);
const historyAfter = await clientA.threads.getHistory(threadId);
console.log(
  JSON.stringify({
    updatedIsState:
      updated.checkpoint.checkpoint_id === state.checkpoint.checkpoint_id &&
      forked.checkpoint.checkpoint_id === forkedState.checkpoint.checkpoint_id,
    contents: state.values.messages.map((m) => m.content),
    firstCheckpoint: first.checkpoint_id,
    forkedParent: forkedState.parent_checkpoint.checkpoint_id,
    deleted: deleted ?? null,
    valuesAfter: after.values,
    historyAfter: historyAfter.length,
  }),
);

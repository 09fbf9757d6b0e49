// Drive threads.copy, threads.count, threads.update and runs.delete of our LangGraph API
// with the real @langchain/langgraph-sdk Client: a run on a new thread, its copy made
// from the other server, counts, then the two writes this server may not serve (each
// one's status, body and how long the client took to give up). Prints one JSON line.
// Usage: node langgraph_thread_admin.mjs <serverA> <serverB> <prompt>
import { Client } from "@langchain/langgraph-sdk";

const [serverA, serverB, prompt] = process.argv.slice(2);
const clientA = new Client({ apiUrl: `${serverA}/langgraph` });
const clientB = new Client({ apiUrl: `${serverB}/langgraph` });

async function refusal(call) {
  const started = Date.now();
  try {
    return { resolved: (await call()) ?? null };
  } catch (error) {
    let body = null;
    try {
      body = JSON.parse(error.message.replace(/^HTTP \d+: /, ""));
    } catch {}
    return { status: error.status ?? null, code: body?.code ?? null, ms: Date.now() - started };
  }
}

const threadId = (await clientA.threads.create()).thread_id;
await fetch(`${serverA}/test/release/${threadId}`, { method: "POST" });
await clientA.runs.wait(threadId, "agent", {
  input: { messages: [{ type: "human", content: prompt }] },
});
const runId = (await clientA.runs.list(threadId))[0].run_id;
const copy = await clientB.threads.copy(threadId);
const copied = await clientA.threads.getState(copy.thread_id);
const count = await clientB.threads.count({ metadata: { graph_id: "agent" } });
const countAll = await clientA.threads.count();
const countNone = await clientA.threads.count({ metadata: { graph_id: "nope" } });
const update = await refusal(() => clientA.threads.update(threadId, { metadata: { a: 1 } }));
const runDelete = await refusal(() => clientB.runs.delete(threadId, runId));
console.log(
  JSON.stringify({
    threadId,
    copy: {
      keys: Object.keys(copy).sort(),
      distinct: copy.thread_id !== threadId,
      status: copy.status,
      contents: copied.values.messages.map((m) => m.content),
    },
    count,
    countAll,
    countNone,
    update,
    runDelete,
  }),
);

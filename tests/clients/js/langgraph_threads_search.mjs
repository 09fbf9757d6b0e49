// Drive our LangGraph API as Agent Chat UI does with the real @langchain/langgraph-sdk
// Client: its connection check (GET <apiUrl>/info), then its thread list
// (threads.search by the graph's id, 100 at most), after a run on a new thread.
// Prints one JSON line of what it saw.
// Usage: node langgraph_threads_search.mjs <serverA> <serverB> <prompt>
import { Client } from "@langchain/langgraph-sdk";

const [serverA, serverB, prompt] = process.argv.slice(2);
const clientA = new Client({ apiUrl: `${serverA}/langgraph` });
const clientB = new Client({ apiUrl: `${serverB}/langgraph` });

const info = await fetch(`${serverB}/langgraph/info`);
const threadId = (await clientA.threads.create()).thread_id;
await fetch(`${serverA}/test/release/${threadId}`, { method: "POST" });
await clientA.runs.wait(threadId, "agent", {
  input: { messages: [{ type: "human", content: prompt }] },
});
const threads = await clientB.threads.search({ metadata: { graph_id: "agent" }, limit: 100 });
const none = await clientB.threads.search({ metadata: { graph_id: "nope" }, limit: 100 });
console.log(
  JSON.stringify({
    infoOk: info.ok,
    threadId,
    found: threads.map((t) => ({
      id: t.thread_id,
      status: t.status,
      first: t.values.messages[0].content,
    })),
    none: none.length,
  }),
);

// Drive threads.update of our LangGraph API (an app with an update_thread hook) with the
// real @langchain/langgraph-sdk Client: a merge answered with the thread, one with
// returnMinimal (Prefer: return=minimal), one with no metadata, one with a ttl; then the
// thread's copy and a count. Prints one JSON line of what it saw.
// Usage: node langgraph_thread_update.mjs <server>
import { Client } from "@langchain/langgraph-sdk";

const [server] = process.argv.slice(2);
const client = new Client({ apiUrl: `${server}/langgraph` });

const threadId = (await client.threads.create({ metadata: { a: 1, b: 2 } })).thread_id;
const updated = await client.threads.update(threadId, { metadata: { b: 3, c: 4 } });
const minimal = await client.threads.update(threadId, {
  metadata: { d: 5 },
  returnMinimal: true,
});
const empty = await client.threads.update(threadId);
const got = await client.threads.get(threadId);
let ttl = null;
try {
  await client.threads.update(threadId, { metadata: { e: 1 }, ttl: 5 });
} catch (error) {
  ttl = { status: error.status, code: JSON.parse(error.message.replace(/^HTTP \d+: /, "")).code };
}
const copy = await client.threads.copy(threadId);
const count = await client.threads.count();
console.log(
  JSON.stringify({
    threadId,
    updated,
    minimal: minimal ?? null,
    empty,
    got: got.metadata,
    ttl,
    copy,
    count,
  }),
);

// Scenario 2b's churn plan through vercel's resumable-stream, for the comparison row.
//
//   node paced.mjs PLAN.json REDIS_URL RATE
//
// One process produces every stream of the plan (createNewResumableStream) and reads each
// through Redis (resumeExistingStream), as a second request would; resuming readers pass
// the characters they already have as skipCharacters. Prints one JSON line of results.
// Latency is receipt time minus the later of the token's send time and the reader's
// (re)attach time, as in the Python runs (benchmarks/_shape.py).
import { readFileSync } from "node:fs";
import { createClient } from "redis";
import resumable from "resumable-stream";

const [planPath, url, rateArg] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planPath, "utf8"));
const period = 1000 / Number(rateArg);
const nowNs = () => Number(process.hrtime.bigint());
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

const publisher = createClient({ url });
const subscriber = createClient({ url });
await Promise.all([publisher.connect(), subscriber.connect()]);
const context = resumable.createResumableStreamContext({
  waitUntil: null,
  publisher,
  subscriber,
  keyPrefix: `bench-${process.pid}`,
});

const latencies = [];
let maxLag = 0;
let unresumable = 0;
const errors = [];
// A failure inside the package's own callbacks is counted and reported, not fatal.
process.on("unhandledRejection", (reason) => errors.push(String(reason)));

function source(firstDue, count) {
  let sent = 0;
  return new ReadableStream({
    async pull(controller) {
      if (sent >= count) {
        controller.close();
        return;
      }
      const delay = firstDue + sent * period - performance.now();
      if (delay > 0) await sleep(delay); // the pace of a model
      else maxLag = Math.max(maxLag, -delay);
      controller.enqueue(`${nowNs()} `);
      sent += 1;
    },
  });
}

async function read(key, skipCharacters, limit) {
  const attached = nowNs();
  let stream;
  try {
    stream = await context.resumeExistingStream(key, skipCharacters);
  } catch (error) {
    // "Timeout waiting for ack": the producer did not answer within the package's 1 s.
    errors.push(String(error));
    return { tokens: 0, chars: 0 };
  }
  if (!stream) {
    unresumable += 1; // null: already done, which this package cannot replay
    return { tokens: 0, chars: 0 };
  }
  const reader = stream.getReader();
  let buffer = "";
  let tokens = 0;
  let chars = 0;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      errors.push(String(error));
      return { tokens, chars };
    }
    const { done, value } = chunk;
    if (done) return { tokens, chars };
    const now = nowNs();
    buffer += value;
    let space;
    while ((space = buffer.indexOf(" ")) >= 0) {
      latencies.push((now - Math.max(Number(buffer.slice(0, space)), attached)) / 1e6);
      buffer = buffer.slice(space + 1);
      tokens += 1;
      chars += space + 1;
      if (tokens === limit) {
        await reader.cancel();
        return { tokens, chars };
      }
    }
  }
}

async function one(planned, t0) {
  const firstDue = t0 + planned.start * 1000;
  await sleep(firstDue - 20 - performance.now());
  const local = await context.createNewResumableStream(planned.key, () =>
    source(firstDue, planned.count),
  );
  // The creating request's own copy is not read: every reader here goes through Redis.
  await local.cancel();
  if (planned.reader === "late") await sleep(firstDue + planned.attach * 1000 - performance.now());
  const limit = planned.reader === "resume" ? planned.detach_after : 0;
  const first = await read(planned.key, 0, limit);
  if (limit === 0 || first.tokens !== limit) return first.tokens;
  await sleep(planned.gap * 1000); // the client's reconnection delay
  const rest = await read(planned.key, first.chars, 0);
  return first.tokens + rest.tokens;
}

const cpuBefore = process.cpuUsage();
const t0 = performance.now() + 500 + plan.length * 0.5;
const counts = await Promise.all(plan.map((planned) => one(planned, t0)));
const cpu = process.cpuUsage(cpuBefore);
latencies.sort((a, b) => a - b);
const pct = (q) => (latencies.length ? latencies[Math.max(0, Math.ceil((latencies.length * q) / 100) - 1)] : null);
const delivered = counts.reduce((a, b) => a + b, 0);
console.log(
  JSON.stringify({
    tokens: delivered,
    expected: plan.reduce((a, p) => a + p.count, 0),
    short: counts.filter((n, i) => n !== plan[i].count).length,
    unresumable,
    errors: errors.length,
    first_errors: errors.slice(0, 3),
    p50_ms: pct(50),
    p99_ms: pct(99),
    max_ms: latencies.length ? latencies[latencies.length - 1] : null,
    max_lag_ms: maxLag,
    cpu_s: (cpu.user + cpu.system) / 1e6,
    node: process.version,
  }),
);
process.exit(0);

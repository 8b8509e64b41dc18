// What idle signaling sockets cost the server: opens N sockets that never join and reports the
// server's resident memory before, with them open, and 3 s after they close.
//
//   SWITCHBOARD_MAX_CONNECTIONS_PER_ADDRESS=100000 SWITCHBOARD_JOIN_TIMEOUT_SECS=120 \
//     target/release/switchboard --bind 127.0.0.1:18181 &
//   node --experimental-websocket bench/idle-sockets.mjs http://127.0.0.1:18181 $! 2000
//
// (The limits are raised because every socket comes from one address and none joins.)
import { readFileSync } from 'node:fs';

const [base, pid, count] = [process.argv[2], process.argv[3], Number(process.argv[4] ?? 1000)];
const rssMiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]) / 1024;
const before = rssMiB();
const sockets = [];
for (let i = 0; i < count; i++) {
  const res = await fetch(`${base}/auth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ userId: `idle${i}`, room: 'idle' }),
  });
  const { token } = await res.json();
  const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/ws/signal?token=${token}`);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = reject;
  });
  sockets.push(ws);
}
await new Promise((r) => setTimeout(r, 1000));
const open = rssMiB();
for (const ws of sockets) ws.close();
await new Promise((r) => setTimeout(r, 3000));
// The server's own count of socket tasks (development posture: /metrics is open).
const metrics = await (await fetch(`${base}/metrics`)).text();
const sessionsAfter = Number(/^switchboard_sessions (\d+)/m.exec(metrics)?.[1]);
console.log(
  JSON.stringify({
    sockets: count,
    rssBeforeMiB: Number(before.toFixed(1)),
    rssOpenMiB: Number(open.toFixed(1)),
    perSocketKiB: Number((((open - before) * 1024) / count).toFixed(1)),
    rssAfterMiB: Number(rssMiB().toFixed(1)),
    sessionsAfter,
  }),
);
process.exit(0);

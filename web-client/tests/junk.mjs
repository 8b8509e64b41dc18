// Junk UDP against a live call: two Chromium pages in an SFU room, then random datagrams (and
// datagrams shaped like RTP and STUN) fired at the media ports the server offered them, from
// addresses the server does not know. The call must lose nothing, and the server's log must
// stay quiet: counters in /metrics, not a line per datagram.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/junk.mjs
// Environment: see harness.mjs. Measurements are printed as JSON lines with "junk" naming them.
import dgram from 'node:dgram';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { check, joinInPage, launchBrowser, openPage, outDir, run, sleep, startServer, step } from './harness.mjs';

const ROOM = 'junk';
const SECONDS = 10;
const PER_SECOND = 100_000;
const TOTAL_TIMEOUT_MS = 120_000;
const LOG = 'junk-server.log';
// The media ports: two media threads from a fixed first port, as an operator would configure
// them (this namespace has nothing else listening).
const MEDIA_PORT = 40000 + Math.floor(Math.random() * 20000);

/** In a page: the server's media ports, from both connections' remote descriptions. */
function serverPorts() {
  const room = /** @type {any} */ (window).__room;
  const ports = new Set();
  for (const pc of [room.publishPc, room.subscribePc]) {
    for (const line of (pc?.remoteDescription?.sdp ?? '').split('\r\n')) {
      const m = /^a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 (\d+) typ host/i.exec(line);
      if (m) ports.add(Number(m[1]));
    }
  }
  return [...ports];
}

/** In a page: packets received so far, per remote track kind. */
async function received() {
  const room = /** @type {any} */ (window).__room;
  const out = { video: 0, audio: 0, lost: 0 };
  for (const p of room.participants.values()) {
    for (const t of p.tracks.values()) {
      for (const s of (await t.receiver.getStats()).values()) {
        if (s.type !== 'inbound-rtp') continue;
        if (t.kind === 'video') out.video += s.framesDecoded ?? 0;
        else out.audio += s.packetsReceived ?? 0;
        out.lost += Math.max(0, s.packetsLost ?? 0);
      }
    }
  }
  return out;
}

/**
 * A datagram: random bytes, or shaped like RTP, RTCP or a STUN binding request.
 * @param {number} i
 */
function junk(i) {
  const size = 20 + (i % 1100);
  const buf = Buffer.alloc(size);
  for (let k = 0; k < size; k += 4) buf.writeUInt32BE((Math.random() * 2 ** 32) >>> 0, k < size - 3 ? k : size - 4);
  switch (i % 4) {
    case 0:
      buf[0] = 0x80; // RTP version 2
      buf[1] = 96;
      break;
    case 1:
      buf[0] = 0x80; // RTCP
      buf[1] = 200;
      break;
    case 2:
      buf.writeUInt16BE(0x0001, 0); // STUN binding request, magic cookie
      buf.writeUInt16BE(size - 20, 2);
      buf.writeUInt32BE(0x2112a442, 4);
      break;
    default:
      break;
  }
  return buf;
}

/** Lines of the server log that are warnings or errors. */
function noisyLines() {
  return readFileSync(path.join(outDir, LOG), 'utf8')
    .split('\n')
    .filter((l) => / (WARN|ERROR) /.test(l)).length;
}

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts', async () => {
    base = await startServer(LOG, ['--mesh-max', '0', '--udp-port', String(MEDIA_PORT), '--media-threads', '2']);
    check('server starts', true, base);
  });
  if (!started) return;
  await launchBrowser();
  const pages = [];
  for (const name of ['ann', 'bob']) {
    const page = await openPage(`junk-${name}`, base, `${base}/healthz`);
    await page.evaluate(joinInPage, { room: ROOM, name });
    pages.push(page);
  }
  await sleep(4000);
  const ports = [...new Set((await Promise.all(pages.map((p) => p.evaluate(serverPorts)))).flat())];
  // Publish and subscribe connections share their media thread's port: junk has nowhere else
  // to go.
  check(
    'every connection names one of the configured media ports',
    ports.length >= 1 && ports.every((p) => p === MEDIA_PORT || p === MEDIA_PORT + 1),
    `offered ${ports.join(', ')}; configured ${MEDIA_PORT} and ${MEDIA_PORT + 1}`,
  );

  await step(`${PER_SECOND} junk datagrams a second for ${SECONDS} s at the media ports`, async () => {
    const before = await Promise.all(pages.map((p) => p.evaluate(received)));
    const noiseBefore = noisyLines();
    const metricsBefore = await (await fetch(`${base}/metrics`)).text();
    const sockets = Array.from({ length: 8 }, () => dgram.createSocket('udp4'));
    // Made beforehand: at 100,000 a second, making each one would be the bottleneck.
    const pool = Array.from({ length: 4096 }, (_, i) => junk(i));
    let sent = 0;
    const start = Date.now();
    for (let second = 0; second < SECONDS; second++) {
      for (let i = 0; i < PER_SECOND; i++) {
        const socket = sockets[i % sockets.length];
        socket.send(pool[sent % pool.length], ports[sent % ports.length], '127.0.0.1');
        sent++;
        if (i % 2000 === 1999) await new Promise((r) => setImmediate(r));
      }
      await sleep(Math.max(0, start + (second + 1) * 1000 - Date.now()));
    }
    const rate = Math.round(sent / ((Date.now() - start) / 1000));
    for (const s of sockets) s.close();
    await sleep(1000);
    const after = await Promise.all(pages.map((p) => p.evaluate(received)));
    const lines = noisyLines() - noiseBefore;
    const metricsAfter = await (await fetch(`${base}/metrics`)).text();
    const unrouted = (/** @type {string} */ text) => Number(/switchboard_egress_unrouted_datagrams_total (\d+)/.exec(text)?.[1] ?? 0);
    console.log(JSON.stringify({ junk: 'flood', sent, rate, ports, warnLines: lines, unroutedCounted: unrouted(metricsAfter) - unrouted(metricsBefore), before, after }));
    check('the server logged at most a few warnings for it', lines <= 5, `${lines} WARN/ERROR lines for ${sent} datagrams, ${rate} a second`);
    check(
      'the call alongside kept decoding video and receiving audio',
      after.every((a, i) => a.video > before[i].video + 50 && a.audio > before[i].audio + 200),
      JSON.stringify({ before, after }),
    );
    // Counted, each one (the kernel may drop some when its buffer fills at this rate).
    const counted = unrouted(metricsAfter) - unrouted(metricsBefore);
    check('the junk is counted in /metrics', counted >= sent / 2 && counted <= sent, `${counted} of ${sent} unrouted datagrams counted`);
  });
}

await run(main, TOTAL_TIMEOUT_MS);

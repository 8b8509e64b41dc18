// End-to-end test of per-subscriber bandwidth on a real shaped link: six publishers (two
// Chromium pages with camera and microphone, four simulcast publishers from switchboard-bench),
// one subscriber page behind a link shaped with tc (scripts/shaped-link, in a network namespace
// of its own) and one subscriber page on the server's own network. The shaped link runs at
// 600 kbit/s, then 5 Mbit/s, then 400 kbit/s; the test samples both subscribers every second.
// The shaped subscriber shows alice on its stage and the others as grid tiles; the other shows
// every camera large.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/shaped.mjs
// Environment: see harness.mjs. Measurements are printed as JSON lines with "shaped" naming them.
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { check, launchBrowser, launchBrowserIn, openPage, outDir, run, sleep, startServer, step } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '../..');
const RIG = path.join(repoRoot, 'scripts/shaped-link');
const NETNS = `sw-shaped-${process.pid}`;
const LINK = '1';
const ROOM = 'shaped';
const BENCH_PUBLISHERS = 4;
const TOTAL_TIMEOUT_MS = 280_000;
const serverBin = process.env.SWITCHBOARD_BIN ?? path.join(repoRoot, 'target/release/switchboard');
const benchBin = path.join(path.dirname(serverBin), 'switchboard-bench');

/** @param {Record<string, unknown>} fields */
const report = (fields) => console.log(JSON.stringify({ shaped: fields.shaped, ...fields }));

/** @param {string[]} args */
const rig = (...args) => execFileSync(RIG, args, { stdio: 'inherit' });
/**
 * Server counters that explain a phase: keyframe requests, NACKs and what answered them (resent,
 * or too old to resend), probe clusters, video the pacers dropped.
 * @param {string} base
 */
const serverCounters = async (base) => {
  const text = await (await fetch(`${base}/metrics`)).text();
  /** @type {Record<string, number>} */
  const out = {};
  for (const name of ['keyframe_requests', 'nacks', 'retransmitted_packets', 'nack_too_old', 'egress_probes', 'egress_paced_drops']) {
    out[name] = Number(new RegExp(`^switchboard_${name}(?:_total)? (\\d+)`, 'm').exec(text)?.[1] ?? 0);
  }
  return out;
};
/** @param {Record<string, number>} a @param {Record<string, number>} b */
const counterDelta = (a, b) => Object.fromEntries(Object.keys(b).map((k) => [k, b[k] - (a[k] ?? 0)]));
/** What the shaped link towards the subscriber dropped (its queue overflowing) and sent, so far. */
const linkStats = () => {
  const text = execFileSync('tc', ['-s', 'qdisc', 'show', 'dev', `sl${LINK}s`], { encoding: 'utf8' });
  const sent = Number(/Sent \d+ bytes (\d+) pkt/.exec(text)?.[1] ?? 0);
  const dropped = Number(/dropped (\d+)/.exec(text)?.[1] ?? 0);
  return { sent, dropped };
};

/**
 * In the page: joins with the SDK; publishers with camera and microphone, subscribers with
 * nothing to send.
 * @param {{room: string, name: string, publish: boolean}} arg
 */
async function joinRoom({ room, name, publish }) {
  const w = /** @type {any} */ (window);
  const sdk = await import('/src/client.js');
  const r = new sdk.Room();
  w.__room = r;
  w.__allocations = [];
  r.on('videoAllocation', (/** @type {any} */ a) =>
    w.__allocations.push({ ...a, name: r.participants.get(a.peerId)?.name ?? null, at: performance.now() }),
  );
  r.on('error', (/** @type {any} */ e) => console.error(`switchboard error ${e.code}: ${e.message}`));
  await r.connect(location.origin, { room, name, audio: publish, video: publish });
  return r.participantId;
}

/** In a subscriber's page: every remote video shown large, so only bandwidth limits it. */
function showEverythingLarge() {
  const room = /** @type {any} */ (window).__room;
  for (const p of room.participants.values()) room.setVideoSize(p.peerId, 'camera', 1280, 720);
  return room.participants.size;
}

/**
 * In a subscriber's page: one camera on the stage (1280x720), the rest as grid tiles (320x180),
 * as a call app lays out a room.
 * @param {string} stage
 */
function showOnStage(stage) {
  const room = /** @type {any} */ (window).__room;
  for (const p of room.participants.values()) {
    const large = p.name === stage;
    room.setVideoSize(p.peerId, 'camera', large ? 1280 : 320, large ? 720 : 180);
  }
  return room.participants.size;
}

/**
 * In a subscriber's page: from now on, the longest time each remote camera went without a new
 * decoded frame (what a person sees as the picture stopping), polled every 50 ms. Chromium's
 * `totalFreezesDuration` sums every short stall; the issue's limit is on any one freeze.
 */
function watchFrameGaps() {
  const w = /** @type {any} */ (window);
  const room = w.__room;
  /** @type {Map<string, {frames: number, at: number, longest: number}>} */
  const gaps = new Map();
  w.__frameGaps = gaps;
  w.__frameGapTimer = setInterval(async () => {
    const now = performance.now();
    for (const p of room.participants.values()) {
      for (const t of p.tracks.values()) {
        if (t.kind !== 'video') continue;
        let frames = 0;
        for (const s of (await t.receiver.getStats()).values()) if (s.type === 'inbound-rtp') frames = s.framesDecoded ?? 0;
        const g = gaps.get(p.name);
        if (!g) gaps.set(p.name, { frames, at: now, longest: 0 });
        else if (frames !== g.frames) Object.assign(g, { frames, at: now });
        else g.longest = Math.max(g.longest, now - g.at);
      }
    }
  }, 50);
}

/** In a subscriber's page: the longest gap between decoded frames per camera, since watching began. */
function frameGaps() {
  const w = /** @type {any} */ (window);
  clearInterval(w.__frameGapTimer);
  return Object.fromEntries([...w.__frameGaps].map(([name, g]) => [name, Math.round(g.longest)]));
}

/** In a subscriber's page: what it receives now, per remote track. */
async function sample() {
  const room = /** @type {any} */ (window).__room;
  const videos = [];
  const audios = [];
  let bytes = 0;
  for (const p of room.participants.values()) {
    for (const t of p.tracks.values()) {
      for (const s of (await t.receiver.getStats()).values()) {
        if (s.type !== 'inbound-rtp') continue;
        bytes += s.bytesReceived ?? 0;
        if (t.kind === 'video') {
          videos.push({
            name: p.name,
            frameWidth: s.frameWidth ?? 0,
            framesDecoded: s.framesDecoded ?? 0,
            freezes: s.totalFreezesDuration ?? 0,
            bytes: s.bytesReceived ?? 0,
          });
        } else {
          audios.push({ name: p.name, received: s.packetsReceived ?? 0, lost: Math.max(0, s.packetsLost ?? 0) });
        }
      }
    }
  }
  return {
    at: performance.now(),
    estimate: room.downlinkEstimate,
    allocations: [...room.videoAllocation.values()],
    bytes,
    videos,
    audios,
  };
}

/**
 * Samples `page` once a second for `seconds`.
 * @param {import('playwright-core').Page} page
 * @param {number} seconds
 */
async function sampleFor(page, seconds) {
  const out = [];
  for (let i = 0; i < seconds; i++) {
    out.push(await page.evaluate(sample));
    await sleep(1000);
  }
  return out;
}

/**
 * The kbit/s received between two samples.
 * @param {any} a
 * @param {any} b
 */
const kbps = (a, b) => Math.round(((b.bytes - a.bytes) * 8) / (b.at - a.at));

/**
 * The worst microphone loss between two samples, in percent.
 * @param {any} a
 * @param {any} b
 */
function worstAudioLoss(a, b) {
  let worst = 0;
  for (const after of b.audios) {
    const before = a.audios.find((/** @type {any} */ x) => x.name === after.name);
    if (!before) continue;
    const received = after.received - before.received;
    const lost = after.lost - before.lost;
    if (received + lost > 0) worst = Math.max(worst, (lost * 100) / (received + lost));
  }
  return worst;
}

/**
 * The widest frame of the Chromium publishers' cameras in a sample (the bench's video is not
 * decodable, so only theirs have a frame width).
 * @param {any} s
 * @param {string[]} names
 */
const widths = (s, names) => names.map((n) => s.videos.find((/** @type {any} */ v) => v.name === n)?.frameWidth ?? 0);

async function main() {
  /** @type {string} */
  let base = '';
  rig('add', NETNS, LINK, '600kbit', '5mbit');
  process.on('exit', () => {
    try {
      execFileSync(RIG, ['del', NETNS, LINK]);
    } catch {
      // already gone
    }
  });
  const started = await step('server starts, reachable through the shaped link', async () => {
    // On the link's server-side address: the shaped namespace reaches it through the link,
    // everyone else here over loopback.
    base = await startServer('shaped-server.log', ['--mesh-max', '0'], 0, `127.1.${LINK}.1`);
    check('server starts', true, base);
  });
  if (!started) return;
  const bench = spawn(
    benchBin,
    ['--url', base, '--room', ROOM, '--publishers', `${BENCH_PUBLISHERS}`, '--subscribers', '0', '--simulcast',
      '--duration', '240', '--quiet', '--out', path.join(outDir, 'bench-shaped')],
    { stdio: 'ignore' },
  );
  process.on('exit', () => bench.kill());
  await launchBrowser();
  const shapedBrowser = await launchBrowserIn(NETNS);
  const publishers = ['alice', 'bob'];
  /** @type {import('playwright-core').Page[]} */
  const pubs = [];
  for (const name of publishers) {
    const page = await openPage(`shaped-${name}`, base, `${base}/healthz`);
    await page.evaluate(joinRoom, { room: ROOM, name, publish: true });
    pubs.push(page);
  }
  const carol = await openPage('shaped-carol', base, `${base}/healthz`);
  await carol.evaluate(joinRoom, { room: ROOM, name: 'carol', publish: false });
  const dave = await openPage('shaped-dave', base, `${base}/healthz`, undefined, shapedBrowser);
  await dave.evaluate(joinRoom, { room: ROOM, name: 'dave', publish: false });
  // Everyone in: the two pages, the bench's publishers, each subscriber sees the other.
  const everyone = 2 + BENCH_PUBLISHERS + 1;
  for (let i = 0; i < 40; i++) {
    const counts = await Promise.all([carol, dave].map((p) => p.evaluate(() => /** @type {any} */ (window).__room.participants.size)));
    if (counts.every((n) => n >= everyone)) break;
    await sleep(500);
  }
  await carol.evaluate(showEverythingLarge);
  // The stage goes first in the allocation: alice's camera, whose freezes the page can count
  // (the bench's synthetic frames decode to nothing).
  const STAGE = 'alice';
  await dave.evaluate(showOnStage, STAGE);

  /** @type {any[]} */
  let carolSamples = [];
  await step('600 kbit/s: audio whole, video low, no long freeze, the estimate near the link', async () => {
    const windowStart = await dave.evaluate(() => performance.now() + 5000);
    // Counted over the settled window, as the rest: from 5 s in.
    /** @type {{ sent: number, dropped: number }} */
    let linkBefore = linkStats();
    /** @type {Record<string, number>} */
    let countersBefore = {};
    const settling = sleep(5000).then(async () => {
      await dave.evaluate(watchFrameGaps);
      linkBefore = linkStats();
      countersBefore = await serverCounters(base);
    });
    const [shaped, open] = await Promise.all([sampleFor(dave, 25), sampleFor(carol, 25)]);
    carolSamples = carolSamples.concat(open.slice(5));
    const settled = shaped.slice(5);
    const first = settled[0];
    const last = settled[settled.length - 1];
    const loss = worstAudioLoss(first, last);
    const received = kbps(first, last);
    // A video the server paused for the link shows "paused: weak connection", not a freeze:
    // only those it kept sending count.
    /** @type {any[]} */
    const events = await dave.evaluate(() => /** @type {any} */ (window).__allocations);
    const pausedOnce = (/** @type {string} */ n) =>
      events.some((e) => e.name === n && e.state === 'paused' && e.at >= windowStart) ||
      last.allocations.length > 0 && events.filter((e) => e.name === n).at(-1)?.state === 'paused';
    const sent = publishers.filter((n) => !pausedOnce(n));
    const frozen = sent.map((n) => {
      const a = first.videos.find((/** @type {any} */ v) => v.name === n)?.freezes ?? 0;
      const b = last.videos.find((/** @type {any} */ v) => v.name === n)?.freezes ?? 0;
      return b - a;
    });
    await settling;
    /** @type {Record<string, number>} */
    const gaps = await dave.evaluate(frameGaps);
    const longestFreezes = sent.map((n) => gaps[n] ?? Infinity);
    const linkAfter = linkStats();
    const linkDropPercent = (100 * (linkAfter.dropped - linkBefore.dropped)) / Math.max(1, linkAfter.sent - linkBefore.sent + linkAfter.dropped - linkBefore.dropped);
    const counters = counterDelta(countersBefore, await serverCounters(base));
    // Congestion control holds a link in a sawtooth (up until the queue pushes back, down a
    // step): where it settles is the middle of the settled window, not its last second.
    const estimates = settled.map((s) => s.estimate).sort((a, b) => a - b);
    const medianEstimate = estimates[Math.floor(estimates.length / 2)];
    report({ shaped: 'slow_link', kbps: received, linkDropPercent, counters, estimate: medianEstimate, estimateRange: [estimates[0], estimates.at(-1)], audioLossPercent: loss, widths: widths(last, publishers), allocations: last.allocations, keptSending: sent, longestFreezeMs: longestFreezes, frozenSecondsInAll: frozen, events: events.map((e) => `${e.name}:${e.state}@${Math.round(e.at)}`) });
    check('the shaped subscriber hears every microphone with under 2 % loss', last.audios.length >= 2 && loss < 2, `${loss.toFixed(2)} % at worst over ${last.audios.length} microphones`);
    check('its videos are lowered or paused for the link', last.allocations.length > 0 && widths(last, publishers).every((w) => w < 640), `${JSON.stringify(last.allocations)}, widths ${widths(last, publishers)}`);
    check('the video on its stage is never paused after its first 5 s', sent.includes(STAGE), `${STAGE}: ${events.filter((e) => e.name === STAGE).map((e) => `${e.state}@${Math.round(e.at)}`).join(', ') || 'never changed'}`);
    check('after its first 5 s, no video it keeps receiving freezes for longer than 1 s', sent.length > 0 && longestFreezes.every((ms) => ms <= 1000), `${sent.map((n, i) => `${n}: longest ${longestFreezes[i]} ms, ${frozen[i].toFixed(2)} s frozen in all`).join('; ') || 'every video paused at some time'}`);
    check('its estimate settles within 30 % of the 600 kbit/s link', medianEstimate >= 420_000 && medianEstimate <= 780_000, `median ${Math.round(medianEstimate / 1000)} kbit/s over the settled 20 s (${Math.round(estimates[0] / 1000)}-${Math.round(estimates.at(-1) / 1000)}), ${received} kbit/s received`);
  });

  await step('5 Mbit/s: higher layers within 10 s', async () => {
    const before = await dave.evaluate(sample);
    rig('rate', NETNS, LINK, '5mbit', '5mbit');
    const raisedAt = Date.now();
    let after = before;
    let raised = false;
    while (Date.now() - raisedAt < 20_000) {
      await sleep(500);
      after = await dave.evaluate(sample);
      raised = widths(after, publishers).some((w, i) => w > widths(before, publishers)[i]) || after.allocations.length < before.allocations.length;
      if (raised) break;
    }
    const took = Date.now() - raisedAt;
    report({ shaped: 'link_raised', ms: took, estimate: after.estimate, widths: widths(after, publishers), allocations: after.allocations });
    check('with the link raised to 5 Mbit/s, higher layers arrive within 10 s', raised && took <= 10_000, `${took} ms, widths ${widths(before, publishers)} -> ${widths(after, publishers)}, estimate ${Math.round(after.estimate / 1000)} kbit/s`);
    carolSamples.push(await carol.evaluate(sample));
    await sleep(5000);
  });

  await step('cut to 400 kbit/s: audio goes on, video adapts within 2 s', async () => {
    const before = await dave.evaluate(sample);
    const seen = await dave.evaluate(() => /** @type {any} */ (window).__allocations.length);
    rig('rate', NETNS, LINK, '400kbit', '5mbit');
    const cutAt = Date.now();
    let adaptedAfter = null;
    while (Date.now() - cutAt < 10_000) {
      await sleep(200);
      const fresh = await dave.evaluate((n) => /** @type {any} */ (window).__allocations.slice(n), seen);
      if (fresh.some((/** @type {any} */ a) => a.state !== 'full')) {
        adaptedAfter = Date.now() - cutAt;
        break;
      }
    }
    const during = await sampleFor(dave, 10);
    const last = during[during.length - 1];
    const heard = last.audios.every((/** @type {any} */ a) => a.received > (before.audios.find((/** @type {any} */ b) => b.name === a.name)?.received ?? 0) + 100);
    report({ shaped: 'link_cut', adaptedMs: adaptedAfter, estimate: last.estimate, kbps: kbps(during[0], last), audioLossPercent: worstAudioLoss(during[0], last) });
    check('after the cut to 400 kbit/s, every microphone keeps arriving', heard, JSON.stringify(last.audios));
    check('video adapts within 2 s', adaptedAfter !== null && adaptedAfter <= 2000, `${adaptedAfter ?? 'never'} ms`);
    carolSamples.push(await carol.evaluate(sample));
  });

  await step('the unshaped subscriber receives full layers throughout', async () => {
    /** @type {any[]} */
    const lowered = await carol.evaluate(() => /** @type {any} */ (window).__allocations);
    const seen = carolSamples.map((s) => widths(s, publishers).join('/'));
    check(
      "carol, on the server's own network, is never lowered or paused for bandwidth",
      lowered.length === 0 && carolSamples.every((s) => s.allocations.length === 0),
      `${lowered.length} allocation changes; widths over time ${[...new Set(seen)].join(', ')} (the publishers' own adaptation aside)`,
    );
  });
  bench.kill();
  await shapedBrowser.close();
}

await run(main, TOTAL_TIMEOUT_MS);

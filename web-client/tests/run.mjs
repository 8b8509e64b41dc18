// End-to-end test: the real server binary and real Chromium pages running the demo app.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/run.mjs
// Environment: SWITCHBOARD_BIN (server binary), CHROMIUM (browser binary), HEADED=1 to watch,
// CLIENT_FROM_DISK=1 to serve web-client/ from this checkout instead of the copy embedded in a
// release binary (so client changes can be tried without rebuilding the server).
import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const webClient = path.resolve(here, '..');
const repoRoot = path.resolve(webClient, '..');
const outDir = path.join(here, 'out');
const serverBin = path.resolve(
  process.env.SWITCHBOARD_BIN ?? path.join(repoRoot, 'target/release/switchboard'),
);
const chromiumBin = process.env.CHROMIUM ?? '/usr/bin/chromium';

const ROOM = 'e2e';
const PAGES = 4;
// Well above Chromium's 300 kbit/s starting estimate and well below what it would estimate on
// loopback unbounded: an estimate at this value shows both the ramp-up (driven by the server's
// transport-wide CC feedback) and the cap (the server's b=TIAS).
const MAX_VIDEO_BITRATE = 600_000;
const TOTAL_TIMEOUT_MS = 170_000;
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--use-fake-ui-for-media-stream',
  '--use-fake-device-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--disable-background-networking',
  '--no-first-run',
  '--disable-gpu',
  '--disable-component-update',
  '--disable-sync',
  '--autoplay-policy=no-user-gesture-required',
];

let passed = 0;
let failed = 0;
/** @type {import('node:child_process').ChildProcess | null} */
let server = null;
/** @type {import('playwright-core').Browser | null} */
let browser = null;
const serverLogTail = /** @type {string[]} */ ([]);
/** @type {import('node:fs').WriteStream | null} */
let serverLog = null;

/**
 * Records one check.
 * @param {string} name
 * @param {boolean} ok
 * @param {string} [detail]
 */
function check(name, ok, detail = '') {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? 'PASS' : 'FAIL'}  ${name}${detail ? `  (${detail})` : ''}`);
  return ok;
}

/**
 * Runs one step; an exception fails it as one check instead of ending the test.
 * @param {string} name
 * @param {() => Promise<void>} fn
 */
async function step(name, fn) {
  try {
    await fn();
    return true;
  } catch (err) {
    check(name, false, err instanceof Error ? err.message.split('\n')[0] : String(err));
    return false;
  }
}

const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {import('node:net').AddressInfo} */ (srv.address());
      srv.close(() => resolve(port));
    });
  });
}

/** @param {number} port */
async function startServer(port) {
  if (!existsSync(serverBin)) throw new Error(`server binary not found: ${serverBin}`);
  const log = createWriteStream(path.join(outDir, 'server.log'));
  serverLog = log;
  const child = spawn(serverBin, ['--bind', `127.0.0.1:${port}`, '--max-video-bitrate', `${MAX_VIDEO_BITRATE}`, '--mesh-max', '0'], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' },
  });
  server = child;
  for (const stream of [child.stdout, child.stderr]) {
    stream?.on('data', (chunk) => {
      log.write(chunk);
      serverLogTail.push(...String(chunk).split('\n').filter(Boolean));
      serverLogTail.splice(0, Math.max(0, serverLogTail.length - 40));
    });
  }
  /** @type {string | null} */
  let exited = null;
  child.on('exit', (code, signal) => (exited = `server exited (code ${code}, signal ${signal})`));
  child.on('error', (err) => (exited = `server failed to start: ${err.message}`));

  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (exited) throw new Error(exited);
    try {
      const res = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(1000) });
      if (res.ok) return base;
    } catch {
      // not listening yet
    }
    await sleep(100);
  }
  throw new Error('GET /healthz did not answer 200 within 20 s');
}

/** Stops the server with SIGTERM; returns its exit code, or null when it had to be killed. */
async function stopServer() {
  const child = server;
  /** @type {number | null} */
  let code = child?.exitCode ?? null;
  if (child && child.exitCode === null && child.signalCode === null) {
    const gone = new Promise((r) => child.once('exit', (c) => r(c)));
    child.kill('SIGTERM');
    const result = await Promise.race([gone, sleep(6000).then(() => 'timeout')]);
    if (result === 'timeout') {
      child.kill('SIGKILL');
      await Promise.race([gone, sleep(2000)]);
      code = null;
    } else {
      code = /** @type {number | null} */ (result);
    }
  }
  const log = serverLog;
  if (log) await new Promise((r) => log.end(r));
  return code;
}

/** CPU seconds (user + system) the server process has used so far. */
function serverCpuSeconds() {
  const pid = server?.pid;
  if (!pid) return 0;
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  // utime and stime are fields 14 and 15 of /proc/PID/stat, in clock ticks (100 per second).
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

const CONTENT_TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };

/**
 * Answers requests for the web client's files from disk.
 * @param {import('playwright-core').BrowserContext} context
 * @param {string} base
 */
async function serveClientFromDisk(context, base) {
  await context.route(
    (url) => url.origin === base && !/^\/(auth|ws|api|healthz|metrics)\b/.test(url.pathname),
    async (route) => {
      const { pathname } = new URL(route.request().url());
      const file = path.join(webClient, pathname === '/' ? 'index.html' : pathname);
      if (!file.startsWith(webClient + path.sep) || !existsSync(file)) return route.continue();
      const type = CONTENT_TYPES[/** @type {keyof CONTENT_TYPES} */ (path.extname(file))];
      await route.fulfill({ body: readFileSync(file), contentType: type ?? 'application/octet-stream' });
    },
  );
}

async function stopBrowser() {
  if (!browser) return;
  await Promise.race([browser.close().catch(() => {}), sleep(5000)]);
}

/** Installed into every page: per remote participant, the inbound RTP stats of its media. */
function installStatsHelper() {
  // When each remote track was announced (setRemoteDescription of the subscribe offer).
  /** @type {Record<string, number>} */
  const trackAt = {};
  // @ts-ignore
  window.__e2eTrackAt = trackAt;
  const Native = window.RTCPeerConnection;
  // @ts-ignore
  window.RTCPeerConnection = class extends Native {
    /** @param {RTCConfiguration} [config] */
    constructor(config) {
      super(config);
      this.addEventListener('track', (e) => (trackAt[e.track.id] ??= performance.now()));
    }
  };
  /** @returns {Promise<Record<string, any>>} by participant name */
  // @ts-ignore
  window.__e2eRemoteStats = async () => {
    // @ts-ignore
    const room = window.__switchboard;
    const pc = room?.subscribePc;
    /** @type {Record<string, any>} */
    const out = {};
    if (!pc || pc.connectionState === 'closed') return out;
    for (const transceiver of pc.getTransceivers()) {
      const sub = transceiver.mid != null ? room.subscriptions.get(transceiver.mid) : undefined;
      if (!sub || !room.participants.has(sub.peerId)) continue;
      const name = room.participants.get(sub.peerId).name;
      const report = await transceiver.receiver.getStats();
      for (const s of report.values()) {
        if (s.type !== 'inbound-rtp') continue;
        out[name] ??= { peerId: sub.peerId };
        out[name][s.kind] = {
          trackIdentifier: s.trackIdentifier,
          framesDecoded: s.framesDecoded ?? 0,
          frameWidth: s.frameWidth ?? 0,
          packetsReceived: s.packetsReceived ?? 0,
          totalAudioEnergy: s.totalAudioEnergy ?? 0,
        };
      }
    }
    return out;
  };
}

/**
 * In the page: waits until `expected` remote videos have decoded a frame. Times are
 * milliseconds since the page's navigation started.
 * @param {{expected: number, timeoutMs: number}} arg
 */
async function firstFrameTimes({ expected, timeoutMs }) {
  const deadline = performance.now() + timeoutMs;
  /** @type {number | null} */
  let first = null;
  // Per remote: from its track being announced to its first decoded frame.
  /** @type {Record<string, number>} */
  const subscribedToFrame = {};
  while (performance.now() < deadline) {
    // @ts-ignore
    const stats = window.__e2eRemoteStats ? await window.__e2eRemoteStats() : {};
    const now = performance.now();
    for (const [name, entry] of Object.entries(stats)) {
      // @ts-ignore
      const announced = window.__e2eTrackAt?.[entry.video?.trackIdentifier];
      if (entry.video?.framesDecoded > 0 && announced != null) subscribedToFrame[name] ??= now - announced;
    }
    const decoding = Object.values(stats).filter((e) => e.video?.framesDecoded > 0).length;
    if (decoding > 0 && first === null) first = now;
    if (decoding >= expected) return { first, all: now, subscribedToFrame };
    await new Promise((r) => setTimeout(r, 25));
  }
  return { first, all: null, subscribedToFrame };
}

/** In the page: bytes and frames the publish connection has sent as video so far. */
async function publishedVideo() {
  // @ts-ignore
  const pc = window.__switchboard?.publishPc;
  if (!pc) return null;
  let bytesSent = 0;
  let available = 0;
  for (const s of (await pc.getStats()).values()) {
    if (s.type === 'outbound-rtp' && s.kind === 'video') bytesSent += s.bytesSent ?? 0;
    if (s.type === 'candidate-pair' && s.nominated) available = Math.max(available, s.availableOutgoingBitrate ?? 0);
  }
  return { bytesSent, available, at: performance.now() };
}

/**
 * @param {any} json  the /api/rooms body
 * @param {string} room
 * @returns {number | null} the room's participant count, null when the room is not listed
 */
function participantsInRoom(json, room) {
  let list = Array.isArray(json) ? json : (json?.rooms ?? []);
  if (!Array.isArray(list)) {
    list = Object.entries(list).map(([name, v]) => ({ name, ...(typeof v === 'object' ? v : {}) }));
  }
  const entry = list.find((r) =>
    [r?.name, r?.room, r?.id].some((v) => typeof v === 'string' && v.toLowerCase() === room),
  );
  if (!entry) return null;
  const p = entry.participants ?? entry.participantCount ?? entry.numParticipants;
  if (typeof p === 'number') return p;
  if (Array.isArray(p)) return p.length;
  return null;
}

/** @param {import('playwright-core').Page} page */
const remoteTileCount = (page) => page.locator('.tile.remote').count();

async function main() {
  mkdirSync(outDir, { recursive: true });

  const port = await freePort();
  /** @type {string} */
  let base = '';
  const started = await step('server starts and answers /healthz', async () => {
    base = await startServer(port);
    check('server starts and answers /healthz', true, base);
  });
  if (!started) return;

  const args = [...CHROMIUM_ARGS];
  if (process.env.CLIENT_FROM_DISK === '1') {
    // A page that Playwright fulfilled has no address space, so Chromium would refuse its
    // WebSocket to 127.0.0.1 as a local-network request.
    const i = args.findIndex((a) => a.startsWith('--disable-features='));
    args[i] += ',LocalNetworkAccessChecks';
  }
  browser = await chromium.launch({
    executablePath: chromiumBin,
    args,
    headless: process.env.HEADED !== '1',
    timeout: 30_000,
  });

  /**
   * @param {string} name
   * @returns {Promise<import('playwright-core').Page>}
   */
  async function openPage(name) {
    const context = await /** @type {import('playwright-core').Browser} */ (browser).newContext({
      viewport: { width: 1000, height: 760 },
    });
    await context.addInitScript(installStatsHelper);
    if (process.env.CLIENT_FROM_DISK === '1') await serveClientFromDisk(context, base);
    const page = await context.newPage();
    const consoleLog = createWriteStream(path.join(outDir, `console-${name}.log`));
    page.on('console', (msg) => {
      consoleLog.write(`[${msg.type()}] ${msg.text()}\n`);
      if (msg.type() === 'error') console.log(`  [${name} console] ${msg.text()}`);
    });
    page.on('pageerror', (err) => console.log(`  [${name} page error] ${err.message}`));
    page.on('close', () => consoleLog.end());
    const url = `${base}/?room=${ROOM}&name=${encodeURIComponent(name)}&autojoin=1`;
    await page.goto(url, { timeout: 15_000 });
    return page;
  }

  const names = Array.from({ length: PAGES }, (_, i) => `user${i + 1}`);
  // The first pages join together; the last joins a room where media already flows, which is
  // what a late joiner's time to first frame measures.
  const early = await Promise.all(names.slice(0, -1).map(openPage));
  const earlyFrames = early.map((page) =>
    page.evaluate(firstFrameTimes, { expected: PAGES - 2, timeoutMs: 45_000 }).catch(() => null),
  );
  await Promise.all(earlyFrames);
  const pages = [...early, await openPage(names[PAGES - 1])];
  const frameWatch = pages.map((page) =>
    page.evaluate(firstFrameTimes, { expected: PAGES - 1, timeoutMs: 45_000 }).catch(() => null),
  );

  await Promise.all(
    pages.map((page, i) =>
      step(`${names[i]} sees ${PAGES - 1} remote participants`, async () => {
        await page.waitForFunction(
          (n) =>
            // @ts-ignore
            window.__switchboard?.participants?.size === n &&
            document.querySelectorAll('.tile.remote').length === n,
          PAGES - 1,
          { timeout: 30_000 },
        );
        check(`${names[i]} sees ${PAGES - 1} remote participants`, true);
      }),
    ),
  );

  await step('GET /api/rooms lists the room with all participants', async () => {
    const res = await fetch(`${base}/api/rooms`, { signal: AbortSignal.timeout(5000) });
    const json = await res.json();
    const count = participantsInRoom(json, ROOM);
    check(
      `GET /api/rooms lists room ${ROOM} with ${PAGES} participants`,
      res.ok && count === PAGES,
      `status ${res.status}, participants ${count}, body ${JSON.stringify(json).slice(0, 200)}`,
    );
  });

  const frames = await Promise.all(frameWatch);
  const fmt = (/** @type {number | null | undefined} */ ms) =>
    ms == null ? 'never' : `${(ms / 1000).toFixed(2)} s`;
  frames.forEach((t, i) => {
    check(
      `${names[i]} decodes video from all ${PAGES - 1} remotes`,
      t?.all != null,
      `page load to first decoded frame ${fmt(t?.first)}, to all ${fmt(t?.all)}`,
    );
  });
  // The late joiner: each remote's video from the moment its subscription was announced to the
  // first decoded frame (negotiation, ICE, DTLS, and the keyframe the server asks for).
  const late = frames[PAGES - 1]?.subscribedToFrame ?? {};
  const lateTimes = Object.values(late);
  check(
    `late joiner ${names[PAGES - 1]} decodes every remote within 3 s of subscribing`,
    lateTimes.length === PAGES - 1 && lateTimes.every((ms) => ms < 3000),
    Object.entries(late)
      .map(([name, ms]) => `${name} ${fmt(ms)}`)
      .join(', '),
  );
  // Existing members get the newcomer's video: from its announcement to their first frame.
  const newcomer = frames
    .slice(0, -1)
    .map((t) => t?.subscribedToFrame?.[names[PAGES - 1]])
    .filter((ms) => ms != null);
  console.log(`      existing members: ${names[PAGES - 1]}'s video announced to first frame: ${newcomer.map(fmt).join(', ')}`);

  // Media must keep flowing: two samples ~2 s apart, per remote participant. Meanwhile the
  // server's CPU is measured, with four publishing pages and twelve forwarded streams each way.
  const cpuBefore = serverCpuSeconds();
  const cpuStart = performance.now();
  const samples = await Promise.all(
    pages.map(async (page) => {
      // @ts-ignore
      const before = await page.evaluate(() => window.__e2eRemoteStats());
      await sleep(2000);
      // @ts-ignore
      const after = await page.evaluate(() => window.__e2eRemoteStats());
      return { before, after };
    }),
  );
  const cpuShare = (serverCpuSeconds() - cpuBefore) / ((performance.now() - cpuStart) / 1000);
  console.log(`      server CPU with ${PAGES} publishing pages: ${(cpuShare * 100).toFixed(1)} % of one core`);
  samples.forEach(({ before, after }, i) => {
    for (const remote of names.filter((n) => n !== names[i])) {
      const v0 = before[remote]?.video;
      const v1 = after[remote]?.video;
      check(
        `${names[i]} receives ${remote}'s video`,
        !!v0 && !!v1 && v1.framesDecoded > v0.framesDecoded && v1.frameWidth > 0,
        v1 ? `framesDecoded ${v0?.framesDecoded} -> ${v1.framesDecoded}, ${v1.frameWidth}px wide` : 'no inbound-rtp',
      );
      const a0 = before[remote]?.audio;
      const a1 = after[remote]?.audio;
      check(
        `${names[i]} receives ${remote}'s audio`,
        !!a0 && !!a1 && a1.packetsReceived > a0.packetsReceived,
        a1 ? `packetsReceived ${a0?.packetsReceived} -> ${a1.packetsReceived}` : 'no inbound-rtp',
      );
    }
  });

  await step('the first publisher ramps up to the configured maximum and stays under it', async () => {
    // By now user1 has published for well over 10 s: its estimate had time to ramp up.
    const a = await pages[0].evaluate(publishedVideo);
    await sleep(3000);
    const b = await pages[0].evaluate(publishedVideo);
    if (!a || !b) throw new Error('no publish connection');
    const rate = ((b.bytesSent - a.bytesSent) * 8) / ((b.at - a.at) / 1000);
    check(
      `${names[0]}'s send estimate ramps up to the ${MAX_VIDEO_BITRATE / 1000} kbit/s maximum and video stays under it`,
      b.available >= 0.8 * MAX_VIDEO_BITRATE &&
        b.available <= 1.05 * MAX_VIDEO_BITRATE &&
        rate > 0 &&
        rate < 1.15 * MAX_VIDEO_BITRATE,
      `estimate ${(b.available / 1000).toFixed(0)} kbit/s, ${(rate / 1000).toFixed(0)} kbit/s sent`,
    );
  });

  await Promise.all(
    pages.map((page, i) =>
      page.screenshot({ path: path.join(outDir, `${names[i]}.png`) }).catch(() => {}),
    ),
  );

  // A participant leaves: the others must drop its tile within 10 s.
  const leaver = names[PAGES - 1];
  await pages[PAGES - 1].context().close();
  const stayers = pages.slice(0, -1);
  await Promise.all(
    stayers.map((page, i) =>
      step(`${names[i]} drops ${leaver}'s tile`, async () => {
        await page.waitForFunction(
          (n) => document.querySelectorAll('.tile.remote').length === n,
          PAGES - 2,
          { timeout: 10_000 },
        );
        const labels = await page.locator('.tile.remote .label').allTextContents();
        check(
          `${names[i]} drops ${leaver}'s tile within 10 s`,
          !labels.includes(leaver),
          `remaining: ${labels.join(', ')}`,
        );
        await page.screenshot({ path: path.join(outDir, `${names[i]}-after-leave.png`) });
      }),
    ),
  );

  // A second "user1" in another case is refused, and the page says so.
  await step('a taken name is refused with name_taken', async () => {
    const dup = await openPage(names[0].toUpperCase());
    await dup.waitForFunction(
      () => {
        const box = document.getElementById('error');
        return !!box && !box.hidden && /name_taken/.test(box.textContent ?? '');
      },
      null,
      { timeout: 15_000 },
    );
    const text = await dup.locator('#error').textContent();
    await dup.screenshot({ path: path.join(outDir, 'name-taken.png') });
    check('a taken name (other case) is refused with name_taken', true, text ?? '');
    const tiles = await remoteTileCount(stayers[0]);
    check(`the refused join does not appear as a participant`, tiles === PAGES - 2, `${tiles} remote tiles`);
    await dup.context().close();
  });
}

const watchdog = setTimeout(async () => {
  check('whole test finishes in time', false, `over ${TOTAL_TIMEOUT_MS / 1000} s`);
  await finish();
}, TOTAL_TIMEOUT_MS);

let finishing = false;
async function finish() {
  if (finishing) return;
  finishing = true;
  clearTimeout(watchdog);
  await stopBrowser();
  const code = await stopServer();
  if (server) check('server exits 0 on SIGTERM', code === 0, `exit code ${code}`);
  if (failed > 0 && serverLogTail.length) {
    console.log('--- server log (last lines; full log in tests/out/server.log) ---');
    for (const line of serverLogTail) console.log(line);
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed > 0 || passed === 0 ? 1 : 0);
}

try {
  await main();
} catch (err) {
  check('test ran to the end', false, err instanceof Error ? err.message.split('\n')[0] : String(err));
} finally {
  await finish();
}

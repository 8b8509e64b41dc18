// Shared by the end-to-end tests: the real server binary, real Chromium (Playwright) and Firefox
// ESR (Puppeteer over WebDriver BiDi), and a tally of checks.
// Environment: SWITCHBOARD_BIN (server binary), CHROMIUM and FIREFOX (browser binaries), HEADED=1 to watch,
// CLIENT_FROM_DISK=1 to serve web-client/ from this checkout instead of the copy embedded in a
// release binary (so client changes can be tried without rebuilding the server).
import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const webClient = path.resolve(here, '..');
const repoRoot = path.resolve(webClient, '..');
export const outDir = path.join(here, 'out');
export const serverBin = path.resolve(
  process.env.SWITCHBOARD_BIN ?? path.join(repoRoot, 'target/release/switchboard'),
);
const chromiumBin = process.env.CHROMIUM ?? '/usr/bin/chromium';
const firefoxBin = process.env.FIREFOX ?? '/usr/bin/firefox-esr';

// Fake camera and microphone without asking, and host candidates on loopback in the clear.
const FIREFOX_PREFS = {
  'media.navigator.streams.fake': true,
  'media.navigator.permission.disabled': true,
  'media.peerconnection.ice.loopback': true,
  'media.peerconnection.ice.obfuscate_host_addresses': false,
  'media.autoplay.default': 0,
  'media.autoplay.blocking_policy': 0,
};

const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--use-fake-ui-for-media-stream',
  // Three fake cameras, so that picking another one can be tested. (Chromium's second fake
  // camera is a depth camera whose frames no encoder takes; the third sends MJPEG.)
  '--use-fake-device-for-media-stream=device-count=3',
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
/** @type {import('puppeteer-core').Browser | null} */
let firefox = null;
const serverLogTail = /** @type {string[]} */ ([]);
/** @type {import('node:fs').WriteStream | null} */
let serverLog = null;

/**
 * Records one check.
 * @param {string} name
 * @param {boolean} ok
 * @param {string} [detail]
 */
export function check(name, ok, detail = '') {
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
export async function step(name, fn) {
  try {
    await fn();
    return true;
  } catch (err) {
    check(name, false, err instanceof Error ? err.message.split('\n')[0] : String(err));
    return false;
  }
}

/**
 * GET /api/rooms with a token that grants listing rooms (minted openly: the server runs in the
 * development posture).
 * @param {string} base
 * @returns {Promise<Response>}
 */
export async function fetchRooms(base) {
  const minted = await fetch(`${base}/auth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ userId: 'operator', room: 'any', grants: { roomList: true } }),
    signal: AbortSignal.timeout(5000),
  });
  const { token } = await minted.json();
  return fetch(`${base}/api/rooms`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(5000) });
}

/**
 * Runs in a page (`page.evaluate(joinInPage, {room, name})`): joins `room` with the SDK's
 * defaults, keeps the Room as `window.__room`, and says what `joined` said.
 * @param {{room: string, name: string}} arg
 */
export async function joinInPage({ room, name }) {
  const w = /** @type {any} */ (window);
  const sdk = await import('/src/client.js');
  const r = new sdk.Room();
  w.__room = r;
  await r.connect(location.origin, { room, name });
  return { participantId: r.participantId, mode: r.mode, iceServers: r.iceServers };
}

export const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

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

/**
 * Starts the server on a free port with `args`; returns its base URL.
 * @param {string} logName  the log file in tests/out
 * @param {string[]} args
 * @param {number} [port]  0 for a free one
 * @param {string} [host]  the address to bind and reach it at: a loopback-range address on a
 *   shaped link's server side (127.1.N.1) is reachable from that link's namespace too, and keeps
 *   the server in its development posture (loopback only, no API keys)
 */
export async function startServer(logName, args, port = 0, host = '127.0.0.1') {
  if (!existsSync(serverBin)) throw new Error(`server binary not found: ${serverBin}`);
  mkdirSync(outDir, { recursive: true });
  port ||= await freePort();
  // A restart (same port) appends to the first run's log.
  const log = createWriteStream(path.join(outDir, logName), { flags: lastStart?.port === port ? 'a' : 'w' });
  lastStart = { logName, args, port };
  serverLog = log;
  const child = spawn(serverBin, ['--bind', `${host}:${port}`, ...args], {
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

  const base = `http://${host}:${port}`;
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

/** @type {{logName: string, args: string[], port: number} | null} */
let lastStart = null;

/**
 * Stops the server (SIGTERM) and starts it again on the same port with the same arguments, as
 * an operator restarting it would.
 * @returns {Promise<{exitCode: number | null, base: string}>}
 */
export async function restartServer() {
  const start = lastStart;
  if (!start) throw new Error('startServer() first');
  const exitCode = await stopServer();
  server = null;
  const base = await startServer(start.logName, start.args, start.port);
  return { exitCode, base };
}

/** Stops the server with SIGTERM; returns its exit code, or null when it had to be killed. */
export async function stopServer() {
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
export function serverCpuSeconds() {
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
  const all = [browser, firefox].filter((b) => b !== null);
  await Promise.race([Promise.all(all.map((b) => b.close().catch(() => {}))), sleep(5000)]);
}

/** Starts Firefox ESR (WebDriver BiDi) with fake media and loopback ICE. */
export async function launchFirefox() {
  firefox = await puppeteer.launch({
    browser: 'firefox',
    executablePath: firefoxBin,
    headless: process.env.HEADED !== '1',
    protocolTimeout: 60_000,
    timeout: 30_000,
    extraPrefsFirefox: FIREFOX_PREFS,
    // The window sets the size: page.setViewport also overrides the screen orientation, a
    // WebDriver BiDi command Debian's Firefox ESR 140 does not have.
    defaultViewport: null,
    args: ['--width=1000', '--height=760'],
  });
  return firefox;
}

/**
 * Opens `url` in Firefox in a fresh browser context, logging the console to
 * tests/out/console-<name>.log. The web client comes from the server (CLIENT_FROM_DISK does
 * not apply here).
 * @param {string} name
 * @param {string} url
 * @param {() => void} [initScript]  runs in the page before its scripts
 * @returns {Promise<import('puppeteer-core').Page>}
 */
export async function openFirefoxPage(name, url, initScript) {
  if (!firefox) throw new Error('launchFirefox() first');
  const context = await firefox.createBrowserContext();
  const page = await context.newPage();
  if (initScript) await page.evaluateOnNewDocument(initScript);
  const consoleLog = createWriteStream(path.join(outDir, `console-${name}.log`));
  page.on('console', (msg) => {
    consoleLog.write(`[${msg.type()}] ${msg.text()}\n`);
    if (msg.type() === 'error') console.log(`  [${name} console] ${msg.text()}`);
  });
  page.on('pageerror', (err) => console.log(`  [${name} page error] ${err instanceof Error ? err.message : err}`));
  page.on('close', () => consoleLog.end());
  await page.goto(url, { timeout: 15_000 });
  return page;
}

/** Starts Chromium with the flags that work in the loopback-only namespace. */
export async function launchBrowser() {
  browser = await launchChromium(chromiumBin);
  return browser;
}

/**
 * A second Chromium running inside network namespace `netns` (scripts/shaped-link), for a
 * client behind a shaped link. Open its pages with `openPage(..., browser)`.
 * @param {string} netns
 */
export async function launchBrowserIn(netns) {
  const wrapper = path.join(outDir, `chromium-in-${netns}.sh`);
  mkdirSync(outDir, { recursive: true });
  writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${netns} ${chromiumBin} "$@"\n`, { mode: 0o755 });
  return launchChromium(wrapper);
}

/** @param {string} executablePath */
async function launchChromium(executablePath) {
  const args = [...CHROMIUM_ARGS];
  if (process.env.CLIENT_FROM_DISK === '1') {
    // A page that Playwright fulfilled has no address space, so Chromium would refuse its
    // WebSocket to 127.0.0.1 as a local-network request.
    const i = args.findIndex((a) => a.startsWith('--disable-features='));
    args[i] += ',LocalNetworkAccessChecks';
  }
  return chromium.launch({
    executablePath,
    args,
    headless: process.env.HEADED !== '1',
    timeout: 30_000,
  });
}

/**
 * Opens `url` in a fresh browser context (its own camera, microphone and storage), logging the
 * page's console to tests/out/console-<name>.log.
 * @param {string} name
 * @param {string} base  the server's base URL
 * @param {string} url
 * @param {() => void} [initScript]  runs in the page before its scripts
 * @param {import('playwright-core').Browser | null} [inBrowser]  another browser than the
 *   one `launchBrowser` started
 * @returns {Promise<import('playwright-core').Page>}
 */
export async function openPage(name, base, url, initScript, inBrowser = browser) {
  if (!inBrowser) throw new Error('launchBrowser() first');
  const context = await inBrowser.newContext({ viewport: { width: 1000, height: 760 } });
  if (initScript) await context.addInitScript(initScript);
  if (process.env.CLIENT_FROM_DISK === '1') await serveClientFromDisk(context, base);
  const page = await context.newPage();
  const consoleLog = createWriteStream(path.join(outDir, `console-${name}.log`));
  page.on('console', (msg) => {
    consoleLog.write(`[${msg.type()}] ${msg.text()}\n`);
    if (msg.type() === 'error') console.log(`  [${name} console] ${msg.text()}`);
  });
  page.on('pageerror', (err) => console.log(`  [${name} page error] ${err.message}`));
  page.on('close', () => consoleLog.end());
  await page.goto(url, { timeout: 15_000 });
  return page;
}

/**
 * Installed into pages: the browser's screen picker answers with a moving canvas (headless
 * browsers with fake media have no screen to share).
 */
export function fakeScreenPicker() {
  navigator.mediaDevices.getDisplayMedia = async () => {
    const canvas = document.createElement('canvas');
    canvas.width = 640;
    canvas.height = 360;
    const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext('2d'));
    let n = 0;
    setInterval(() => {
      ctx.fillStyle = `hsl(${(n += 5) % 360}, 70%, 45%)`;
      ctx.fillRect(0, 0, 640, 360);
      ctx.fillStyle = '#fff';
      ctx.font = '40px sans-serif';
      ctx.fillText(`Shared screen, frame ${n / 5}`, 40, 190);
    }, 66);
    return canvas.captureStream(15);
  };
}

/** @type {ReturnType<typeof setTimeout> | undefined} */
let watchdog;

/**
 * Runs `main`, then stops browser and server and exits with the result; fails the run when it
 * takes longer than `timeoutMs`.
 * @param {() => Promise<void>} main
 * @param {number} timeoutMs
 */
export async function run(main, timeoutMs) {
  watchdog = setTimeout(async () => {
    check('whole test finishes in time', false, `over ${timeoutMs / 1000} s`);
    await finish();
  }, timeoutMs);
  try {
    await main();
  } catch (err) {
    check('test ran to the end', false, err instanceof Error ? err.message.split('\n')[0] : String(err));
  } finally {
    await finish();
  }
}

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

/**
 * In the page: the width and frames decoded so far of the video shown in the remote tile
 * labelled `name` (or on the stage, for `null`), from its receiver's stats (headless Firefox
 * paints no frames, so the element's own counters stand still).
 * @param {string | null} name
 */
export async function videoOf(name) {
  const video =
    name === null
      ? /** @type {HTMLVideoElement | null} */ (document.getElementById('stage-video'))
      : [...document.querySelectorAll('.tile.remote')]
          .find((t) => t.querySelector('.label')?.textContent === name)
          ?.querySelector('video');
  const track = /** @type {MediaStream | null} */ (video?.srcObject ?? null)?.getVideoTracks()[0];
  if (!video || !track) return { width: 0, frames: 0, trackId: '' };
  const room = /** @type {any} */ (window).__switchboard;
  const pcs = [room.subscribePc, ...[...room.mesh.values()].map((/** @type {any} */ l) => l.pc)];
  let frames = 0;
  for (const pc of pcs) {
    const receiver = pc?.getReceivers().find((/** @type {RTCRtpReceiver} */ r) => r.track === track);
    if (!receiver) continue;
    for (const s of (await receiver.getStats()).values()) {
      if (s.type === 'inbound-rtp' && s.kind === 'video') frames += s.framesDecoded ?? 0;
    }
  }
  return { width: video.videoWidth, frames, trackId: track.id };
}

/**
 * True when `page` (Chromium's or Firefox's) decodes the video of the remote tile labelled
 * `name` within `timeoutMs`: it has a size and its receiver's decoded frames keep growing.
 * @param {import('playwright-core').Page | import('puppeteer-core').Page} page
 * @param {string} name
 */
export async function decodesVideoOf(page, name, timeoutMs = 25_000) {
  const deadline = Date.now() + timeoutMs;
  const none = { width: 0, frames: 0 };
  while (Date.now() < deadline) {
    // @ts-ignore  the two libraries' evaluate signatures differ only in their types
    const before = await page.evaluate(videoOf, name).catch(() => none);
    await sleep(1000);
    // @ts-ignore
    const after = await page.evaluate(videoOf, name).catch(() => none);
    if (after.width > 0 && after.frames > before.frames + 5) return true;
  }
  return false;
}

/**
 * True once `predicate(arg)` holds in the page, false after `timeoutMs`. (Playwright's and
 * Puppeteer's waitForFunction take their arguments in different orders; evaluate is alike.)
 * @template T
 * @param {import('playwright-core').Page | import('puppeteer-core').Page} page
 * @param {(arg: T) => boolean | Promise<boolean>} predicate
 * @param {T} arg
 */
export async function until(page, predicate, arg, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    // @ts-ignore  the two libraries' evaluate signatures differ only in their types
    if (await page.evaluate(predicate, arg).catch(() => false)) return true;
    await sleep(250);
  }
  return false;
}

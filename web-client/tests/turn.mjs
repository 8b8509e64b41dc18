// TURN with the server's short-lived credentials: Debian's coturn (use-auth-secret) beside the
// server, and Chromium pages that may use relayed candidates only (iceTransportPolicy 'relay',
// as behind a firewall that lets nothing else through). In a mesh of two they reach each other
// through the relay, and in an SFU room they reach the server through it, each decoding the
// other's video. scripts/test installs coturn.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/turn.mjs
import { spawn } from 'node:child_process';
import { createWriteStream, mkdirSync } from 'node:fs';
import path from 'node:path';
import { check, joinInPage, launchBrowser, openPage, outDir, run, sleep, startServer, step, stopServer } from './harness.mjs';

const SECRET = 'a-secret-shared-with-the-turn-server';
const TURN_PORT = 3479;
const TOTAL_TIMEOUT_MS = 180_000;

/** Installed into pages: every peer connection uses relayed candidates only, and is recorded. */
function relayOnly() {
  const w = /** @type {any} */ (window);
  w.__pcs = [];
  const Native = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends Native {
    /** @param {RTCConfiguration} [config] */
    constructor(config) {
      super({ ...(config ?? {}), iceTransportPolicy: 'relay' });
      w.__pcs.push(this);
    }
  };
}

/** In a page: decoded video frames, and the candidate types of the pairs in use. */
async function mediaPath() {
  const pcs = /** @type {RTCPeerConnection[]} */ (/** @type {any} */ (window).__pcs);
  let framesDecoded = 0;
  const types = new Set();
  for (const pc of pcs) {
    if (pc.connectionState === 'closed') continue;
    const stats = await pc.getStats();
    for (const s of stats.values()) {
      if (s.type === 'inbound-rtp' && s.kind === 'video') framesDecoded += s.framesDecoded ?? 0;
      if (s.type === 'candidate-pair' && s.state === 'succeeded' && s.nominated) {
        types.add(stats.get(s.localCandidateId)?.candidateType);
      }
    }
  }
  return { framesDecoded, candidateTypes: [...types] };
}

function startTurn() {
  mkdirSync(outDir, { recursive: true });
  const log = createWriteStream(path.join(outDir, 'turn-coturn.log'));
  const child = spawn('turnserver', [
    '-n', '--no-cli', '--no-tls', '--no-dtls', '--simple-log', '--log-file=stdout',
    '--listening-ip=127.0.0.1', `--listening-port=${TURN_PORT}`, '--relay-ip=127.0.0.1',
    '--min-port=49160', '--max-port=49260', '--realm=switchboard.test',
    '--use-auth-secret', `--static-auth-secret=${SECRET}`,
    // Everything here is on loopback, which coturn refuses to relay to by default.
    '--allow-loopback-peers',
    `--pidfile=${path.join(outDir, 'turnserver.pid')}`,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout?.pipe(log);
  child.stderr?.pipe(log);
  return child;
}

/**
 * Two relay-only pages in `room` of the server at `base`: both decode each other through TURN.
 * @param {string} base
 * @param {string} room
 * @param {'mesh' | 'sfu'} expectMode
 */
async function callThroughTurn(base, room, expectMode) {
  const pages = [];
  for (const name of ['Ann', 'Bob']) {
    const page = await openPage(`turn-${expectMode}-${name}`, base, `${base}/?room=none`, relayOnly);
    const joined = await page.evaluate(joinInPage, { room, name });
    pages.push({ name, page, joined });
  }
  const handed = pages[0].joined.iceServers.find((/** @type {any} */ s) => s.urls.some((/** @type {string} */ u) => u.startsWith('turn:')));
  check(
    'joined.iceServers hands out the TURN URLs with an expiring username and a credential',
    !!handed &&
      handed.username === `${Number(handed.username.split(':')[0])}:Ann` &&
      Number(handed.username.split(':')[0]) > Date.now() / 1000 + 3600 &&
      typeof handed.credential === 'string',
    JSON.stringify(handed),
  );
  const deadline = Date.now() + 30_000;
  /** @type {any[]} */
  let paths = [];
  while (Date.now() < deadline) {
    paths = await Promise.all(pages.map(({ page }) => page.evaluate(mediaPath)));
    if (paths.every((p) => p.framesDecoded > 10)) break;
    await sleep(500);
  }
  const modes = await Promise.all(pages.map(({ page }) => page.evaluate(() => /** @type {any} */ (window).__room.mode)));
  check(
    `in ${expectMode} mode, relay-only pages decode each other's video through TURN`,
    modes.every((m) => m === expectMode) &&
      paths.every((p) => p.framesDecoded > 10 && p.candidateTypes.length > 0 && p.candidateTypes.every((/** @type {string} */ t) => t === 'relay')),
    JSON.stringify({ modes, paths }),
  );
  for (const { page } of pages) await page.context().close();
}

async function main() {
  const turn = startTurn();
  try {
    await sleep(1000);
    process.env.SWITCHBOARD_TURN_URLS = `["turn:127.0.0.1:${TURN_PORT}?transport=udp","turn:127.0.0.1:${TURN_PORT}?transport=tcp"]`;
    process.env.SWITCHBOARD_TURN_SECRET = SECRET;
    await launchBrowser();
    await step('a mesh of two behind relay-only firewalls', async () => {
      const base = await startServer('turn-mesh.log', []);
      await callThroughTurn(base, 'turn-mesh', 'mesh');
      await stopServer();
    });
    await step('an SFU room behind relay-only firewalls', async () => {
      const base = await startServer('turn-sfu.log', ['--mesh-max', '0']);
      await callThroughTurn(base, 'turn-sfu', 'sfu');
      await stopServer();
    });
    await step('credentials signed with another secret get no relay', async () => {
      process.env.SWITCHBOARD_TURN_SECRET = 'not-the-secret-the-turn-server-shares';
      const base = await startServer('turn-wrong.log', ['--mesh-max', '0']);
      const page = await openPage('turn-wrong', base, `${base}/?room=none`, relayOnly);
      await page.evaluate(joinInPage, { room: 'turn-wrong', name: 'Eve' });
      await sleep(5000);
      const relays = await page.evaluate(async () => {
        let count = 0;
        for (const pc of /** @type {RTCPeerConnection[]} */ (/** @type {any} */ (window).__pcs)) {
          for (const s of (await pc.getStats()).values()) if (s.type === 'local-candidate' && s.candidateType === 'relay') count++;
        }
        return count;
      });
      check('the TURN server refuses them: no relayed candidate in 5 s', relays === 0, `${relays} relayed candidates`);
      await page.context().close();
      await stopServer();
    });
  } finally {
    turn.kill('SIGTERM');
  }
}

await run(main, TOTAL_TIMEOUT_MS);

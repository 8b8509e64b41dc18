// A page behind a firewall that lets no UDP through joins an SFU call through TURN over TCP and
// decodes everyone, and everyone decodes it. The page's Chromium runs in a network namespace of
// its own (scripts/shaped-link, unshaped at 100 Mbit/s) whose nftables drop every UDP datagram
// in and out; the server and Debian's coturn listen on the link's server side, and the server
// hands out only a `turn:...?transport=tcp` URL with short-lived credentials. Two pages outside
// the firewall publish too. scripts/test installs coturn and nftables.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/firewall.mjs
import { execFileSync, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { check, decodesVideoOf, launchBrowser, launchBrowserIn, openPage, outDir, run, startServer, step } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const RIG = path.join(here, '../../scripts/shaped-link');
const NETNS = `sw-fw-${process.pid}`;
const LINK = '2';
const SERVER_IP = `127.1.${LINK}.1`;
const TURN_PORT = 3478;
const SECRET = 'a-secret-shared-with-the-turn-server';
const TOTAL_TIMEOUT_MS = 150_000;

/** @param {string[]} args */
const inNetns = (...args) => execFileSync('ip', ['netns', 'exec', NETNS, ...args], { encoding: 'utf8' });

/** Every UDP datagram into or out of the namespace is dropped, and counted. */
function blockUdp() {
  inNetns('nft', 'add', 'table', 'inet', 'firewall');
  for (const [chain, hook] of [['in', 'input'], ['out', 'output']]) {
    inNetns('nft', 'add', 'chain', 'inet', 'firewall', chain, `{ type filter hook ${hook} priority 0; policy accept; }`);
    inNetns('nft', 'add', 'rule', 'inet', 'firewall', chain, 'meta', 'l4proto', 'udp', 'counter', 'drop');
  }
}

/** UDP datagrams the firewall dropped so far. */
function udpDropped() {
  const rules = inNetns('nft', 'list', 'table', 'inet', 'firewall');
  return [...rules.matchAll(/packets (\d+)/g)].reduce((sum, m) => sum + Number(m[1]), 0);
}

function startTurn() {
  mkdirSync(outDir, { recursive: true });
  const log = createWriteStream(path.join(outDir, 'firewall-coturn.log'));
  const child = spawn('turnserver', [
    '-n', '--no-cli', '--no-tls', '--no-dtls', '--simple-log', '--log-file=stdout',
    `--listening-ip=${SERVER_IP}`, `--listening-port=${TURN_PORT}`, `--relay-ip=${SERVER_IP}`,
    '--min-port=49300', '--max-port=49400', '--realm=switchboard.test',
    '--use-auth-secret', `--static-auth-secret=${SECRET}`,
    // Everything here is on loopback-range addresses, which coturn refuses to relay to by default.
    '--allow-loopback-peers',
    `--pidfile=${path.join(outDir, 'firewall-turnserver.pid')}`,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout?.pipe(log);
  child.stderr?.pipe(log);
  return child;
}

/** In the page: the candidates its server connections use (type, and the protocol to the relay). */
async function candidatesInUse() {
  const room = /** @type {any} */ (window).__switchboard;
  const used = [];
  for (const pc of [room?.publishPc, room?.subscribePc]) {
    if (!pc) continue;
    const stats = await pc.getStats();
    for (const s of stats.values()) {
      if (s.type !== 'candidate-pair' || s.state !== 'succeeded' || !s.nominated) continue;
      const local = stats.get(s.localCandidateId);
      used.push({ type: local?.candidateType, relayProtocol: local?.relayProtocol ?? null });
    }
  }
  return used;
}

run(async () => {
  execFileSync(RIG, ['add', NETNS, LINK, '100mbit', '100mbit'], { stdio: 'inherit' });
  process.on('exit', () => {
    try {
      execFileSync(RIG, ['del', NETNS, LINK]);
    } catch {
      // already gone
    }
  });
  blockUdp();
  const turn = startTurn();
  process.on('exit', () => turn.kill());
  process.env.SWITCHBOARD_TURN_URLS = `["turn:${SERVER_IP}:${TURN_PORT}?transport=tcp"]`;
  process.env.SWITCHBOARD_TURN_SECRET = SECRET;
  const base = await startServer('firewall-server.log', ['--mesh-max', '0'], 0, SERVER_IP);
  await launchBrowser();
  const walled = await launchBrowserIn(NETNS);
  const url = (/** @type {string} */ name) => `${base}/?room=Firewall&name=${name}&autojoin=1`;
  const ann = await openPage('firewall-ann', base, url('Ann'));
  const ben = await openPage('firewall-ben', base, url('Ben'));
  const cid = await openPage('firewall-cid', base, url('Cid'), undefined, walled);

  await step('Cid, behind a firewall without UDP, and the others decode each other', async () => {
    const [a, b, c1, c2] = await Promise.all([
      decodesVideoOf(ann, 'Cid', 40_000),
      decodesVideoOf(ben, 'Cid', 40_000),
      decodesVideoOf(cid, 'Ann', 40_000),
      decodesVideoOf(cid, 'Ben', 40_000),
    ]);
    check('Ann decodes Cid', a);
    check('Ben decodes Cid', b);
    check('Cid decodes Ann', c1);
    check('Cid decodes Ben', c2);
  });
  await step('Cid\'s media goes through TURN over TCP, and the firewall dropped its UDP', async () => {
    const used = await cid.evaluate(candidatesInUse);
    check(
      'both of Cid\'s server connections use a relayed candidate reached over TCP',
      used.length === 2 && used.every((u) => u.type === 'relay' && u.relayProtocol === 'tcp'),
      JSON.stringify(used),
    );
    const dropped = udpDropped();
    check('the firewall dropped UDP (Cid\'s direct and TURN-over-UDP attempts)', dropped > 0, `${dropped} datagrams`);
    await cid.screenshot({ path: path.join(outDir, 'firewall-cid.png') });
  });
}, TOTAL_TIMEOUT_MS);

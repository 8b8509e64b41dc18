// A cluster of three nodes on one redis-server, each node in a network namespace of its own on a
// shared bridge (loopback-range addresses 127.2.0.1-3, the bridge and Redis on 127.2.0.254),
// with Chromium pages: two people going online through different nodes see each other (one
// lobby for the cluster); two pages in a call enter through node-c (as behind a load balancer) and are
// redirected to the node the room was placed on; that node is killed (SIGKILL) mid-call and the
// pages are back, decoding each other, on a live node; that node is then drained (asked through
// another node) and the call moves again and goes on. Times are printed. scripts/test installs
// redis-server.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/cluster.mjs
import { execFileSync, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync } from 'node:fs';
import path from 'node:path';
import { check, decodesVideoOf, launchBrowser, openPage, outDir, run, serverBin, sleep, step } from './harness.mjs';

const TOTAL_TIMEOUT_MS = 240_000;
const SECRET = 'a-cluster-test-secret-0123456789abcdef';
const BASIC = `Basic ${Buffer.from(`backend:${SECRET}`).toString('base64')}`;
const REDIS_PORT = 6391;
const BRIDGE = 'swbr0';
const BRIDGE_IP = '127.2.0.254';
const NETNS = (/** @type {number} */ i) => `sw-node-${i}-${process.pid}`;
const nodeIp = (/** @type {number} */ i) => `127.2.0.${i + 1}`;

/** @param {string[]} args */
const ip = (...args) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'inherit'] });
/** @param {string} key */
const sysctl = (key, ns = '') => execFileSync('sh', ['-c', `${ns ? `ip netns exec ${ns} ` : ''}sysctl -qw ${key} 2>/dev/null || true`]);

/** The bridge here, and one namespace per node joined to it by a veth pair. */
function buildNetwork() {
  sysctl('net.ipv4.conf.all.route_localnet=1');
  ip('link', 'add', BRIDGE, 'type', 'bridge');
  sysctl(`net.ipv6.conf.${BRIDGE}.disable_ipv6=1`);
  sysctl(`net.ipv4.conf.${BRIDGE}.route_localnet=1`);
  ip('addr', 'add', `${BRIDGE_IP}/24`, 'dev', BRIDGE);
  ip('link', 'set', BRIDGE, 'up');
  for (const i of [0, 1, 2]) {
    const ns = NETNS(i);
    const [outer, inner] = [`swn${i}o`, `swn${i}i`];
    ip('netns', 'add', ns);
    ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner);
    ip('link', 'set', inner, 'netns', ns);
    sysctl(`net.ipv6.conf.${outer}.disable_ipv6=1`);
    ip('link', 'set', outer, 'master', BRIDGE);
    ip('link', 'set', outer, 'up');
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    sysctl('net.ipv4.conf.all.route_localnet=1', ns);
    sysctl(`net.ipv4.conf.${inner}.route_localnet=1`, ns);
    sysctl(`net.ipv6.conf.${inner}.disable_ipv6=1`, ns);
    ip('-n', ns, 'addr', 'add', `${nodeIp(i)}/24`, 'dev', inner);
    ip('-n', ns, 'link', 'set', inner, 'up');
  }
  process.on('exit', () => {
    for (const i of [0, 1, 2]) {
      try { ip('netns', 'del', NETNS(i)); } catch { /* gone */ }
    }
    try { ip('link', 'del', BRIDGE); } catch { /* gone */ }
  });
}

/** @type {import('node:child_process').ChildProcess[]} */
const children = [];

function startRedis() {
  const child = spawn('redis-server', ['--port', String(REDIS_PORT), '--bind', BRIDGE_IP, '--save', '', '--appendonly', 'no', '--protected-mode', 'no'], { stdio: 'ignore' });
  children.push(child);
  return child;
}

/**
 * @param {number} index
 * @param {string[]} origins  every node's origin: a page of one opens sockets at the others
 */
function startNode(index, origins) {
  const url = `http://${nodeIp(index)}:8080`;
  mkdirSync(outDir, { recursive: true });
  const log = createWriteStream(path.join(outDir, `cluster-node-${index}.log`));
  // `ip netns exec` enters the namespace and executes the server in place: the same pid.
  const child = spawn('ip', ['netns', 'exec', NETNS(index), serverBin], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: {
      ...process.env,
      SWITCHBOARD_BIND: `${nodeIp(index)}:8080`,
      SWITCHBOARD_UDP_PORT: '40000',
      SWITCHBOARD_MEDIA_THREADS: '1',
      SWITCHBOARD_MESH_MAX: '0',
      SWITCHBOARD_API_KEYS: `{backend="${SECRET}"}`,
      SWITCHBOARD_REDIS_URL: `redis://${BRIDGE_IP}:${REDIS_PORT}`,
      SWITCHBOARD_PUBLIC_URL: url,
      SWITCHBOARD_NODE_ID: `node-${'abc'[index]}`,
      SWITCHBOARD_ALLOWED_ORIGINS: JSON.stringify(origins),
      SWITCHBOARD_DRAIN_TIMEOUT_SECS: '30',
    },
  });
  child.stdout?.pipe(log);
  child.stderr?.pipe(log);
  children.push(child);
  return { id: `node-${'abc'[index]}`, url, child };
}

/** @param {string} base @param {string} user @param {string} room @param {object} [grants] */
async function mint(base, user, room, grants = {}) {
  const res = await fetch(`${base}/auth/token`, {
    method: 'POST',
    headers: { authorization: BASIC, 'content-type': 'application/json' },
    body: JSON.stringify({ userId: user, room, grants }),
  });
  if (!res.ok) throw new Error(`token: ${res.status} ${await res.text()}`);
  return (await res.json()).token;
}

/** @param {string} base */
async function nodesOf(base) {
  const res = await fetch(`${base}/api/nodes`, { headers: { authorization: BASIC }, signal: AbortSignal.timeout(2000) });
  return (await res.json()).nodes ?? [];
}

/** The node a page's signaling socket is on, from the room's listing. @param {string} base @param {string} room */
async function hostOf(base, room) {
  const res = await fetch(`${base}/api/rooms`, { headers: { authorization: BASIC } });
  const { rooms } = await res.json();
  return rooms.find((/** @type {any} */ r) => r.name === room)?.node ?? null;
}

/** In the page: the room's connection state. */
function roomState() {
  return /** @type {any} */ (window).__switchboard?.state ?? 'none';
}

run(async () => {
  buildNetwork();
  startRedis();
  const origins = [0, 1, 2].map((i) => `http://${nodeIp(i)}:8080`);
  const nodes = [0, 1, 2].map((i) => startNode(i, origins));
  // Pages enter through node-c. Placement goes by load, ties to the lowest id: the room lands
  // on node-a, so the join is redirected there, and node-c lives through the kill below (a
  // load balancer would stop sending clients to a dead node; here the entry just stays alive).
  const entry = nodes[2].url;
  await step('three nodes see each other in Redis', async () => {
    const deadline = Date.now() + 20_000;
    let seen = 0;
    while (Date.now() < deadline) {
      seen = await nodesOf(entry).then((n) => n.length).catch(() => 0);
      if (seen === 3) break;
      await sleep(300);
    }
    check('a cluster of three', seen === 3, `${seen} nodes`);
  });

  const browser = await launchBrowser();
  void browser;
  await step('two people online through different nodes see each other: one lobby for the cluster', async () => {
    const online = async (/** @type {string} */ name, /** @type {string} */ base) => {
      const token = await mint(base, name.toLowerCase(), 'lobby', { lobby: true });
      return openPage(`cluster-${name}`, base, `${base}/?name=${name}&lobby=1&token=${token}`);
    };
    const eve = await online('Eve', entry);
    const fay = await online('Fay', nodes[0].url);
    const names = (/** @type {import('playwright-core').Page} */ page) =>
      page.waitForFunction(() => document.querySelectorAll('#online-list li').length === 1, null, { timeout: 15_000 })
        .then(() => page.$$eval('#online-list li span', (items) => items.map((s) => s.textContent ?? '')))
        .catch(() => []);
    const [seenByEve, seenByFay] = await Promise.all([names(eve), names(fay)]);
    check('Eve (through node-c) sees Fay (through node-a) online, and Fay sees Eve', seenByEve.join() === 'Fay' && seenByFay.join() === 'Eve', `${seenByEve} / ${seenByFay}`);
    await eve.context().close();
    await fay.context().close();
  });
  const ann = await openPage('cluster-ann', entry, `${entry}/?room=Standup&name=Ann&autojoin=1&token=${await mint(entry, 'ann', 'Standup')}`);
  const ben = await openPage('cluster-ben', entry, `${entry}/?room=Standup&name=Ben&autojoin=1&token=${await mint(entry, 'ben', 'Standup')}`);
  let host = '';
  await step('both pages, entering through node-c, decode each other on the room\'s node', async () => {
    check('Ann decodes Ben', await decodesVideoOf(ann, 'Ben'));
    check('Ben decodes Ann', await decodesVideoOf(ben, 'Ann'));
    host = (await hostOf(entry, 'Standup')) ?? '';
    check('the room lives on another node than the entry (a redirect)', host !== '' && host !== 'node-c', host);
  });

  await step('the room\'s node is killed mid-call: both decode each other again on a live node', async () => {
    const victim = nodes.find((n) => n.id === host);
    if (!victim) throw new Error(`no node ${host}`);
    const killed = Date.now();
    victim.child.kill('SIGKILL');
    const [a, b] = await Promise.all([decodesVideoOf(ann, 'Ben', 30_000), decodesVideoOf(ben, 'Ann', 30_000)]);
    const seconds = (Date.now() - killed) / 1000;
    check('Ann decodes Ben again', a);
    check('Ben decodes Ann again', b);
    const now = (await hostOf(entry, 'Standup')) ?? '';
    check('the room lives on another node now', now !== '' && now !== host, `${host} -> ${now}`);
    check('video back within 10 s of the SIGKILL', a && b && seconds < 10, `${seconds.toFixed(1)} s`);
    console.log(`  failover: both pages decode each other ${seconds.toFixed(1)} s after SIGKILL`);
    host = now;
  });

  await step('that node drains, asked through another: the call moves and goes on', async () => {
    const draining = nodes.find((n) => n.id === host);
    const asker = nodes.find((n) => n.id !== host && n.child.exitCode === null && n.child.signalCode === null);
    if (!draining || !asker) throw new Error('no node to drain');
    const asked = Date.now();
    const res = await fetch(`${asker.url}/api/nodes/${host}/drain`, { method: 'POST', headers: { authorization: BASIC } });
    check('drain accepted', res.status === 202, `HTTP ${res.status}`);
    const exited = new Promise((r) => draining.child.once('exit', (code) => r(code)));
    // Both leave the draining node; the room is then on the node left.
    let moved = false;
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline && !moved) {
      await sleep(300);
      const now = await hostOf(asker.url, 'Standup').catch(() => null);
      moved = now === asker.id;
    }
    check('the room is placed on the node left', moved);
    const [a, b] = await Promise.all([decodesVideoOf(ann, 'Ben', 20_000), decodesVideoOf(ben, 'Ann', 20_000)]);
    const seconds = (Date.now() - asked) / 1000;
    check('Ann decodes Ben after the drain', a);
    check('Ben decodes Ann after the drain', b);
    const code = await Promise.race([exited, sleep(15_000).then(() => 'still running')]);
    check('the drained node exits 0 once empty', code === 0, `exit ${code}`);
    console.log(`  drain: both pages decode each other ${seconds.toFixed(1)} s after the drain was asked; the node exited ${((Date.now() - asked) / 1000).toFixed(1)} s after`);
    check('both pages still in the room', (await ann.evaluate(roomState)) === 'joined' && (await ben.evaluate(roomState)) === 'joined');
    await ann.screenshot({ path: path.join(outDir, 'cluster-after-drain.png') });
  });
  for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
}, TOTAL_TIMEOUT_MS);

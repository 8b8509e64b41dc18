// End-to-end test of calling a person (docs/protocol.md, section 12) as people use the app: go
// online, see who else is, call; the callee's ringing dialog, a decline and a busy said in words,
// an accepted call where both decode each other, a third person invited into it, and a call
// between Chromium and Firefox ESR.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/calls.mjs
// Environment: see harness.mjs.
import path from 'node:path';
import { check, launchBrowser, launchFirefox, openFirefoxPage, openPage, outDir, restartServer, run, startServer, step, decodesVideoOf } from './harness.mjs';

const TOTAL_TIMEOUT_MS = 120_000;

/** @typedef {import('playwright-core').Page} Page */

/**
 * Opens the app as `name` and goes online with the button the join screen shows.
 * @param {string} base
 * @param {string} name
 */
async function online(base, name) {
  const page = await openPage(name.toLowerCase(), base, `${base}/`);
  await page.fill('#name', name);
  await page.click('#go-online');
  await page.waitForFunction(() => /** @type {any} */ (window).__switchboardLobby?.state === 'online', null, { timeout: 15_000 });
  return page;
}

/**
 * The names in the page's online list.
 * @param {Page} page
 */
const onlineNames = (page) => page.$$eval('#online-list li span', (items) => items.map((s) => s.textContent ?? ''));

/**
 * Clicks the Call (or Invite) button next to `name` in the online list.
 * @param {Page} page
 * @param {string} name
 */
async function callFromList(page, name) {
  await page.locator('#online-list li', { hasText: name }).locator('button').click();
}

/**
 * Waits until the status line reads `text`; says what it read.
 * @param {Page} page
 * @param {string} text
 */
async function statusSays(page, text) {
  const ok = await page
    .waitForFunction((t) => document.getElementById('status')?.textContent === t, text, { timeout: 10_000 })
    .then(() => true)
    .catch(() => false);
  return { ok, shown: (await page.textContent('#status')) ?? '' };
}

/** @param {import('puppeteer-core').Page} page */
const firefoxOnline = (page) =>
  page.waitForFunction(() => /** @type {any} */ (window).__switchboardLobby?.state === 'online', { timeout: 15_000 });

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts', async () => {
    base = await startServer('server-calls.log', []);
    check('server starts', true, base);
  });
  if (!started) return;
  await launchBrowser();

  const alice = await online(base, 'Alice');
  const bob = await online(base, 'Bob');
  const carol = await online(base, 'Carol');
  await step('who is online is shown live', async () => {
    await alice.waitForFunction(() => document.querySelectorAll('#online-list li').length === 2, null, { timeout: 10_000 });
    const names = await onlineNames(alice);
    check('Alice sees Bob and Carol online, by name', names.join(',') === 'Bob,Carol', names.join(','));
    const self = (await alice.textContent('#lobby-self')) ?? '';
    check('Alice is told she is online', self === 'You are online as Alice.', self);
    await alice.screenshot({ path: path.join(outDir, 'calls-online.png') });
  });

  await step('a declined call is said in words', async () => {
    await callFromList(alice, 'Bob');
    await bob.waitForSelector('#incoming:not([hidden])', { timeout: 10_000 });
    const ringing = (await bob.textContent('#incoming-text')) ?? '';
    check("Bob's page rings: a dialog says Alice is calling, with Accept and Decline", ringing === 'Alice is calling', ringing);
    const calling = (await alice.textContent('#call-text')) ?? '';
    check('Alice sees "Calling Bob…" with a Cancel button', calling === 'Calling Bob…' && (await alice.locator('#call-cancel').isVisible()), calling);
    await bob.screenshot({ path: path.join(outDir, 'calls-incoming.png') });
    await alice.screenshot({ path: path.join(outDir, 'calls-calling.png') });
    await bob.click('#incoming-decline');
    const said = await statusSays(alice, 'Bob declined the call.');
    check('Alice reads "Bob declined the call."', said.ok, said.shown);
    check("the dialog leaves Bob's page", await bob.locator('#incoming').isHidden());
  });

  await step('an accepted call: both decode each other', async () => {
    await callFromList(alice, 'Bob');
    await bob.waitForSelector('#incoming:not([hidden])', { timeout: 10_000 });
    await bob.click('#incoming-accept');
    for (const page of [alice, bob]) {
      await page.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 15_000 });
    }
    const rooms = await Promise.all([alice, bob].map((p) => p.evaluate(() => /** @type {any} */ (window).__switchboard.roomName)));
    check('both are in one new room', rooms[0] === rooms[1] && /^call-[0-9a-f]{32}$/.test(rooms[0]), rooms.join(' '));
    const mode = await alice.evaluate(() => /** @type {any} */ (window).__switchboard.mode);
    check('a call of two is peer to peer', mode === 'mesh', mode);
    check("Alice decodes Bob's video", await decodesVideoOf(alice, 'Bob'));
    check("Bob decodes Alice's video", await decodesVideoOf(bob, 'Alice'));
    const status = (await alice.textContent('#status')) ?? '';
    check('the call is named for people, not by its room id', status.startsWith('Call with Bob · 2 participants'), status);
    const bobListed = (await alice.locator('#online-list li', { hasText: 'Bob' }).textContent()) ?? '';
    check('the online list shows Bob in this call, with nothing to press', bobListed === 'Bobin this call', bobListed);
    await alice.screenshot({ path: path.join(outDir, 'calls-in-call.png') });
  });

  await step('someone in a call is busy', async () => {
    await callFromList(carol, 'Bob');
    const said = await statusSays(carol, 'Bob is in another call. Try again later.');
    check('Carol reads that Bob is in another call', said.ok, said.shown);
    await carol.screenshot({ path: path.join(outDir, 'calls-busy.png') });
  });

  await step('a third person invited into the call', async () => {
    const invite = (await alice.locator('#online-list li', { hasText: 'Carol' }).locator('button').textContent()) ?? '';
    check('in a call, the list offers to invite', invite === 'Invite', invite);
    await callFromList(alice, 'Carol');
    await carol.waitForSelector('#incoming:not([hidden])', { timeout: 10_000 });
    await carol.click('#incoming-accept');
    await carol.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 15_000 });
    const rooms = await Promise.all([alice, carol].map((p) => p.evaluate(() => /** @type {any} */ (window).__switchboard.roomName)));
    check('Carol joins the same call', rooms[0] === rooms[1], rooms.join(' '));
    check("Carol decodes Alice's video", await decodesVideoOf(carol, 'Alice'));
    check("Carol decodes Bob's video", await decodesVideoOf(carol, 'Bob'));
  });

  await step('a call between Chromium and Firefox', async () => {
    await launchFirefox();
    const dave = await openFirefoxPage('dave', `${base}/?name=Dave&lobby=1`);
    await firefoxOnline(dave);
    const erin = await online(base, 'Erin');
    await erin.waitForFunction(() => [...document.querySelectorAll('#online-list li span')].some((s) => s.textContent === 'Dave'), null, {
      timeout: 10_000,
    });
    await callFromList(erin, 'Dave');
    await dave.waitForFunction(() => !document.getElementById('incoming')?.hidden, { timeout: 10_000 });
    const ringing = await dave.evaluate(() => document.getElementById('incoming-text')?.textContent);
    check("Firefox rings: Dave's page says Erin is calling", ringing === 'Erin is calling', String(ringing));
    await dave.click('#incoming-accept');
    await dave.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', { timeout: 15_000 });
    await erin.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 15_000 });
    check("Dave (Firefox) decodes Erin's video", await decodesVideoOf(dave, 'Erin'));
    check("Erin (Chromium) decodes Dave's video", await decodesVideoOf(erin, 'Dave'));
    await dave.screenshot({ path: path.join(outDir, 'calls-firefox.png') });
  });

  await step('back online by itself after a server restart', async () => {
    await alice.evaluate(() => {
      const w = /** @type {any} */ (window);
      w.__lobbyEvents = [];
      for (const type of ['reconnecting', 'reconnected', 'disconnected']) w.__switchboardLobby.on(type, () => w.__lobbyEvents.push(type));
    });
    await restartServer();
    const back = await alice
      .waitForFunction(() => /** @type {any} */ (window).__lobbyEvents.includes('reconnected') && /** @type {any} */ (window).__switchboardLobby.state === 'online', null, { timeout: 30_000 })
      .then(() => true)
      .catch(() => false);
    const events = await alice.evaluate(() => /** @type {any} */ (window).__lobbyEvents.join(','));
    check('Alice goes online again by herself (reconnecting, then reconnected)', back && events.startsWith('reconnecting,reconnected'), events);
    // Bob may come back before or after Alice: either way she sees him in the list.
    const seesBob = await alice
      .waitForFunction(() => [...document.querySelectorAll('#online-list li span')].some((s) => s.textContent === 'Bob'), null, { timeout: 30_000 })
      .then(() => true)
      .catch(() => false);
    check('Alice sees Bob online again', seesBob, (await onlineNames(alice)).join(','));
  });
}

run(main, TOTAL_TIMEOUT_MS);

// End-to-end test of sending files in the app (docs/sdk.md): an offer the recipient declines,
// said on both sides; a 5 MB file accepted by a Chromium and a Firefox ESR page in a mesh call,
// with progress on both sides, arriving byte-identical (SHA-256) with a Save link; a transfer
// cancelled midway; then a fourth participant moves the room to the SFU, and a 5 MB file sent to
// everyone through the server arrives byte-identical in two Chromium pages and Firefox, and a
// transfer through the server is cancelled by its sender.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/files.mjs
// Environment: see harness.mjs.
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { check, launchBrowser, launchFirefox, openFirefoxPage, openPage, outDir, run, startServer, step, until } from './harness.mjs';

const TOTAL_TIMEOUT_MS = 240_000;
const ROOM = 'files';

/** @typedef {import('playwright-core').Page} Page */
/** @typedef {import('playwright-core').Page | import('puppeteer-core').Page} AnyPage */

/**
 * In the page: the text of the files panel's row whose text includes `name`.
 * @param {string} name
 */
function rowText(name) {
  return [...document.querySelectorAll('#files-list li')].map((li) => li.textContent ?? '').find((t) => t.includes(name)) ?? '';
}

/**
 * In the page: counts file progress events and keeps the received files' SHA-256, as
 * `window.__files`.
 */
function watchTransfers() {
  const w = /** @type {any} */ (window);
  const room = w.__switchboard;
  w.__files = { progress: 0, received: /** @type {Record<string, string>} */ ({}) };
  room.on('fileProgress', () => w.__files.progress++);
  room.on('fileReceived', async (/** @type {any} */ t) => {
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', await t.blob.arrayBuffer()));
    w.__files.received[t.name] = [...digest].map((b) => b.toString(16).padStart(2, '0')).join('');
  });
}

/**
 * In the page: clicks `label` in the files row that mentions `name`.
 * @param {{name: string, label: string}} arg
 */
function clickInRow({ name, label }) {
  const row = [...document.querySelectorAll('#files-list li')].find((li) => li.textContent?.includes(name));
  const button = [...(row?.querySelectorAll('button') ?? [])].find((b) => b.textContent === label);
  button?.click();
  return !!button;
}

/**
 * @param {AnyPage} page
 * @param {'mesh' | 'sfu'} mode
 */
const joinedIn = (page, mode) => until(page, (m) => /** @type {any} */ (window).__switchboard?.state === 'joined' && /** @type {any} */ (window).__switchboard?.mode === m, mode);

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts', async () => {
    base = await startServer('server-files.log', []);
    check('server starts', true, base);
  });
  if (!started) return;
  await launchBrowser();
  const ann = await openPage('ann', base, `${base}/?room=${ROOM}&name=Ann&autojoin=1`);
  const ben = await openPage('ben', base, `${base}/?room=${ROOM}&name=Ben&autojoin=1`);
  await joinedIn(ann, 'mesh');
  await joinedIn(ben, 'mesh');
  await until(ann, () => /** @type {any} */ (window).__switchboard.mesh.size === 1 && [.../** @type {any} */ (window).__switchboard.mesh.values()][0].pc.connectionState === 'connected', null);
  for (const page of [ann, ben]) await page.evaluate(watchTransfers);

  await step('a declined file', async () => {
    await ann.setInputFiles('#file-input', { name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('not for you') });
    const offered = await until(ben, (n) => document.querySelector('#files-list li')?.textContent?.includes(n) ?? false, 'notes.txt');
    const text = await ben.evaluate(rowText, 'notes.txt');
    check('Ben is offered the file by name and size, with Accept and Decline', offered && text === 'Ann sends notes.txt (11 B): accept it?AcceptDecline', text);
    const waiting = await ann.evaluate(rowText, 'notes.txt');
    check('Ann sees it waiting for Ben', waiting.startsWith('notes.txt (11 B) to Ben: waiting for them to accept'), waiting);
    await ben.evaluate(clickInRow, { name: 'notes.txt', label: 'Decline' });
    const said = await until(ann, (n) => document.querySelector(`#files-list li`)?.textContent === `${n} (11 B) to Ben: they declined it`, 'notes.txt');
    check('Ann reads that Ben declined it', said, await ann.evaluate(rowText, 'notes.txt'));
  });

  /** @type {import('puppeteer-core').Page | undefined} */
  let cid;
  await step('Firefox joins the call', async () => {
    await launchFirefox();
    const page = await openFirefoxPage('cid', `${base}/?room=${ROOM}&name=Cid&autojoin=1`);
    const ok = await joinedIn(page, 'mesh');
    const connected = await until(page, () => /** @type {any} */ (window).__switchboard.mesh.size === 2 && [.../** @type {any} */ (window).__switchboard.mesh.values()].every((l) => l.pc.connectionState === 'connected'), null);
    await page.evaluate(watchTransfers);
    check('Cid (Firefox) joins the mesh call', ok && connected);
    cid = page;
  });

  await step('a 5 MB file arrives byte-identical in Chromium and Firefox', async () => {
    const data = randomBytes(5 * 1024 * 1024);
    const digest = createHash('sha256').update(data).digest('hex');
    await ann.setInputFiles('#file-input', { name: 'report.bin', mimeType: 'application/octet-stream', buffer: data });
    const recipients = /** @type {[AnyPage, string][]} */ ([[ben, 'Ben'], ...(cid ? [[cid, 'Cid']] : [])]);
    for (const [page, name] of recipients) {
      const offered = await until(page, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent?.includes(n)), 'report.bin');
      check(`${name} is offered report.bin`, offered);
      await page.evaluate(clickInRow, { name: 'report.bin', label: 'Accept' });
    }
    await ben.screenshot({ path: path.join(outDir, 'files-receiving.png') });
    for (const [page, name] of recipients) {
      const arrived = await until(page, (n) => !!(/** @type {any} */ (window).__files.received[n]), 'report.bin', 30_000);
      const got = await page.evaluate(() => /** @type {any} */ (window).__files);
      check(`${name} receives report.bin byte-identical (SHA-256)`, arrived && got.received['report.bin'] === digest, `${got.received['report.bin']?.slice(0, 16)} vs ${digest.slice(0, 16)}`);
      check(`${name} saw progress as it came`, got.progress > 10, `${got.progress} progress events`);
      // @ts-ignore
      const save = await page.evaluate(() => document.querySelector('#files-list li[data-state="done"] a')?.getAttribute('download'));
      check(`${name} gets a Save link with the file's name`, save === 'report.bin', String(save));
    }
    const sent = await ann.evaluate(() => /** @type {any} */ (window).__files.progress);
    check('Ann saw her side of the progress', sent > 10, `${sent} progress events`);
    await ben.screenshot({ path: path.join(outDir, 'files-received.png') });
  });

  await step('a transfer cancelled midway', async () => {
    // Made in the page: handing 40 MB to the file input over the DevTools protocol is slow.
    await ann.evaluate(() => {
      const file = Object.assign(new Blob([new Uint8Array(40 * 1024 * 1024)]), { name: 'big.bin' });
      /** @type {any} */ (window).__switchboard.sendFile(file, { to: [.../** @type {any} */ (window).__switchboard.participants.values()].find((p) => p.name === 'Ben')?.peerId });
    });
    await until(ben, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent?.includes(n)), 'big.bin');
    await ben.evaluate(clickInRow, { name: 'big.bin', label: 'Accept' });
    await until(ben, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent?.includes(n) && li.querySelector('progress')), 'big.bin');
    const cancelled = await ben.evaluate(clickInRow, { name: 'big.bin', label: 'Cancel' });
    const said = await until(ann, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent === `${n} (40.0 MB) to Ben: cancelled`), 'big.bin');
    check('Ben cancels while receiving, and Ann reads "cancelled"', cancelled && said, await ann.evaluate(rowText, 'big.bin'));
  });

  await step('a 5 MB file to everyone through the server (SFU)', async () => {
    const dee = await openPage('dee', base, `${base}/?room=${ROOM}&name=Dee&autojoin=1`);
    const pages = /** @type {[AnyPage, string][]} */ ([[ann, 'Ann'], [ben, 'Ben'], [dee, 'Dee'], ...(cid ? [[cid, 'Cid']] : [])]);
    let settled = true;
    for (const [page] of pages) {
      settled &&= await until(page, () => {
        const room = /** @type {any} */ (window).__switchboard;
        return room?.mode === 'sfu' && !room.switching && room.publishPc?.connectionState === 'connected';
      }, null, 30_000);
    }
    check('a fourth participant moves the room to the SFU', settled);
    await dee.evaluate(watchTransfers);
    // @ts-ignore
    const shown = await ben.evaluate(() => !document.getElementById('send-file')?.hidden);
    check('Send file is offered through the server too', shown);
    const data = randomBytes(5 * 1024 * 1024);
    const digest = createHash('sha256').update(data).digest('hex');
    await ben.setInputFiles('#file-input', { name: 'minutes.bin', mimeType: 'application/octet-stream', buffer: data });
    const recipients = pages.filter(([page]) => page !== ben);
    for (const [page, name] of recipients) {
      const offered = await until(page, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent?.includes(n)), 'minutes.bin');
      check(`${name} is offered minutes.bin through the server`, offered);
      await page.evaluate(clickInRow, { name: 'minutes.bin', label: 'Accept' });
    }
    await dee.screenshot({ path: path.join(outDir, 'files-sfu-receiving.png') });
    for (const [page, name] of recipients) {
      const arrived = await until(page, (n) => !!(/** @type {any} */ (window).__files.received[n]), 'minutes.bin', 60_000);
      const got = await page.evaluate(() => /** @type {any} */ (window).__files.received['minutes.bin']);
      check(`${name} receives minutes.bin byte-identical through the server`, arrived && got === digest, `${got?.slice(0, 16)} vs ${digest.slice(0, 16)}`);
    }
    const progress = await dee.evaluate(() => /** @type {any} */ (window).__files.progress);
    check('Dee saw progress as it came through the server', progress > 10, `${progress} progress events`);
    const sent = await until(ben, (n) => [...document.querySelectorAll('#files-list li')].filter((li) => li.textContent?.includes(n) && li.dataset.state === 'done').length === 3, 'minutes.bin');
    check('Ben sees all three sends done', sent, await ben.evaluate(() => [...document.querySelectorAll('#files-list li')].map((li) => li.textContent).join(' | ')));
    await ben.screenshot({ path: path.join(outDir, 'files-sfu-sent.png') });
  });

  await step('a transfer through the server cancelled by its sender', async () => {
    await ann.evaluate(() => {
      const room = /** @type {any} */ (window).__switchboard;
      const file = Object.assign(new Blob([new Uint8Array(40 * 1024 * 1024)]), { name: 'huge.bin' });
      room.sendFile(file, { to: [...room.participants.values()].find((p) => p.name === 'Ben')?.peerId });
    });
    await until(ben, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent?.includes(n)), 'huge.bin');
    await ben.evaluate(clickInRow, { name: 'huge.bin', label: 'Accept' });
    const moving = await until(ben, (n) => {
      const row = [...document.querySelectorAll('#files-list li')].find((li) => li.textContent?.includes(n));
      return Number(row?.querySelector('progress')?.value ?? 0) > 0;
    }, 'huge.bin');
    const cancelled = await ann.evaluate(clickInRow, { name: 'huge.bin', label: 'Cancel' });
    const said = await until(ben, (n) => [...document.querySelectorAll('#files-list li')].some((li) => li.textContent === `Ann sends ${n} (40.0 MB): cancelled`), 'huge.bin');
    check('Ann cancels while sending through the server, and Ben reads "cancelled"', moving && cancelled && said, await ben.evaluate(rowText, 'huge.bin'));
  });
}

run(main, TOTAL_TIMEOUT_MS);

// End-to-end test of meeting strangers (docs/protocol.md, section 13) as people use the app:
// three press "Meet someone new", two are matched and decode each other, the third waits with a
// visible indicator and is matched when someone presses Next; the one left is told in words; and
// a Chromium page meets a Firefox ESR page.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/meet.mjs
// Environment: see harness.mjs.
import path from 'node:path';
import { check, launchBrowser, launchFirefox, openFirefoxPage, openPage, outDir, run, startServer, step, decodesVideoOf } from './harness.mjs';

const TOTAL_TIMEOUT_MS = 120_000;

/** @typedef {import('playwright-core').Page} Page */

/**
 * Opens the app as `name` and presses "Meet someone new".
 * @param {string} base
 * @param {string} name
 */
async function meet(base, name) {
  const page = await openPage(name.toLowerCase(), base, `${base}/`);
  await page.fill('#name', name);
  await page.click('#meet-start');
  await page.waitForFunction(() => ['waiting', 'matched'].includes(/** @type {any} */ (window).__switchboardMeet?.state), null, {
    timeout: 15_000,
  });
  return page;
}

/**
 * @param {Page} page
 * @returns {Promise<string>}
 */
const meetStatus = async (page) => (await page.textContent('#meet-status')) ?? '';

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts', async () => {
    base = await startServer('server-meet.log', []);
    check('server starts', true, base);
  });
  if (!started) return;
  await launchBrowser();

  const ann = await meet(base, 'Ann');
  const ben = await meet(base, 'Ben');
  const cat = await meet(base, 'Cat');
  await step('two are matched, the third waits', async () => {
    check('Ann and Ben decode each other', (await decodesVideoOf(ann, 'Ben')) && (await decodesVideoOf(ben, 'Ann')));
    const annSays = await meetStatus(ann);
    check('Ann reads whom she talks with', annSays === 'You are talking with Ben.', annSays);
    const waiting = await cat.evaluate(() => ({
      text: document.getElementById('meet-status')?.textContent,
      indicator: document.getElementById('meet-status')?.hasAttribute('data-waiting'),
      state: /** @type {any} */ (window).__switchboardMeet?.state,
    }));
    check('Cat waits, with a pulsing indicator', waiting.state === 'waiting' && waiting.indicator === true && waiting.text === 'Looking for someone…', JSON.stringify(waiting));
    await cat.screenshot({ path: path.join(outDir, 'meet-waiting.png') });
    await ann.screenshot({ path: path.join(outDir, 'meet-matched.png') });
  });

  await step('Next: the one who waited is matched, the one left is told', async () => {
    await ann.click('#meet-next');
    check('Ann, pressing Next, meets Cat', await decodesVideoOf(ann, 'Cat'));
    check('Cat meets Ann', await decodesVideoOf(cat, 'Ann'));
    const told = await ben
      .waitForFunction(() => document.getElementById('meet-status')?.textContent === 'Ann left. Press Find to meet someone else.', null, { timeout: 10_000 })
      .then(() => true)
      .catch(() => false);
    check('Ben reads that Ann left', told, await meetStatus(ben));
    const left = await ben.evaluate(() => /** @type {any} */ (window).__switchboard?.state);
    check("Ben's page left the room", left === 'closed', String(left));
  });

  await step('Chromium meets Firefox', async () => {
    await ben.click('#meet-find');
    await launchFirefox();
    const dee = await openFirefoxPage('dee', `${base}/?name=Dee&meet=1`);
    check('Ben (Chromium) decodes Dee (Firefox)', await decodesVideoOf(ben, 'Dee'));
    check('Dee (Firefox) decodes Ben (Chromium)', await decodesVideoOf(dee, 'Ben'));
  });

  await step('Stop', async () => {
    await cat.click('#meet-stop');
    const stopped = await cat
      .waitForFunction(() => document.getElementById('meet-status')?.textContent === 'Stopped. Press Find to meet someone.', null, { timeout: 10_000 })
      .then(() => true)
      .catch(() => false);
    check('Cat stops and is told how to look again', stopped, await meetStatus(cat));
    const told = await ann
      .waitForFunction(() => document.getElementById('meet-status')?.textContent === 'Cat left. Press Find to meet someone else.', null, { timeout: 10_000 })
      .then(() => true)
      .catch(() => false);
    check('Ann reads that Cat left', told, await meetStatus(ann));
  });
}

run(main, TOTAL_TIMEOUT_MS);

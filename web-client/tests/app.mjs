// End-to-end test of the meeting app as a person uses it: the join form, an invite link, chat
// (also for a late joiner), mute shown on the others, leaving, and a server restart survived.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/app.mjs
// Environment: see harness.mjs.
import path from 'node:path';
import { check, launchBrowser, openPage, outDir, restartServer, run, startServer, step } from './harness.mjs';

const ROOM = 'Standup';
const TOTAL_TIMEOUT_MS = 120_000;
// What a person might type that must show as text, never as markup.
const TRICKY = '<img src=x onerror="window.__pwned=1"> & "quotes" – ünïcödé';

/** @typedef {import('playwright-core').Page} Page */

/**
 * Joins through the form the page shows.
 * @param {Page} page
 * @param {string} name
 * @param {string} [room]  typed into the form when given (an invite link fills it in)
 */
async function joinFromForm(page, name, room) {
  if (room !== undefined) await page.fill('#room', room);
  await page.fill('#name', name);
  await page.click('#join-form button[type=submit]');
  await page.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, {
    timeout: 15_000,
  });
}

/**
 * @param {Page} page
 * @param {number} count
 */
const waitForTiles = (page, count) =>
  page.waitForFunction((n) => document.querySelectorAll('.tile.remote').length === n, count, { timeout: 20_000 });

/**
 * Sends a chat message through the chat panel.
 * @param {Page} page
 * @param {string} text
 */
async function chat(page, text) {
  if (await page.locator('#chat').isHidden()) await page.click('#chat-toggle');
  await page.fill('#chat-input', text);
  await page.press('#chat-input', 'Enter');
}

/**
 * @param {Page} page
 * @returns {Promise<string[]>} the chat log as shown, "who: text" per line
 */
const chatLines = (page) =>
  page.$$eval('#chat-log li', (items) =>
    items.map((li) => `${li.querySelector('.who')?.textContent}: ${li.querySelector('.text')?.textContent}`),
  );

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts', async () => {
    base = await startServer('server-app.log', []);
    check('server starts', true, base);
  });
  if (!started) return;
  await launchBrowser();

  const ann = await openPage('ann', base, `${base}/`);
  await step('join from the form', async () => {
    await joinFromForm(ann, 'Ann', ROOM);
    check('Ann joins by typing room and name into the form', await ann.locator('#join-form').isHidden());
  });
  const bob = await openPage('bob', base, `${base}/?room=${ROOM}`);
  await step('join from an invite link', async () => {
    const prefilled = await bob.inputValue('#room');
    await joinFromForm(bob, 'Bob');
    check('Bob joins from an invite link /?room=… (room filled in)', prefilled === ROOM, `room field: ${prefilled}`);
  });
  await step('two pages see each other', async () => {
    await Promise.all([waitForTiles(ann, 1), waitForTiles(bob, 1)]);
    const labels = [await ann.locator('.tile.remote .label').textContent(), await bob.locator('.tile.remote .label').textContent()];
    check('Ann and Bob each see the other\'s tile, by name', labels[0] === 'Bob' && labels[1] === 'Ann', labels.join(', '));
  });

  await step('chat', async () => {
    await chat(ann, TRICKY);
    await bob.waitForFunction(() => document.querySelectorAll('#chat-log li').length === 1, null, { timeout: 10_000 });
    const lines = await chatLines(bob);
    check('a chat message arrives on the other page exactly as typed', lines[0] === `Ann: ${TRICKY}`, lines.join(' | '));
    const injected = await bob.evaluate(() => ({
      pwned: /** @type {any} */ (window).__pwned === 1,
      images: document.querySelectorAll('#chat-log img').length,
    }));
    check('chat text is shown as text, never as markup', !injected.pwned && injected.images === 0, JSON.stringify(injected));
    check('the other page marks unread chat on its closed chat button', (await bob.textContent('#chat-toggle'))?.includes('•') ?? false);
    await chat(bob, 'hi Ann');
    await ann.waitForFunction(() => document.querySelectorAll('#chat-log li').length === 2, null, { timeout: 10_000 });
    const annLines = await chatLines(ann);
    check('the sender sees its own message as "You" and the reply', annLines[0] === `You: ${TRICKY}` && annLines[1] === 'Bob: hi Ann', annLines.join(' | '));
  });

  const cat = await openPage('cat', base, `${base}/?room=${ROOM}&name=Cat&autojoin=1`);
  await step('a late joiner gets the chat history', async () => {
    await cat.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 15_000 });
    await cat.click('#chat-toggle');
    await cat.waitForFunction(() => document.querySelectorAll('#chat-log li').length === 2, null, { timeout: 10_000 });
    const lines = await chatLines(cat);
    check('Cat, joining later, sees the chat so far', lines[0] === `Ann: ${TRICKY}` && lines[1] === 'Bob: hi Ann', lines.join(' | '));
    await cat.screenshot({ path: path.join(outDir, 'app-chat.png') });
  });

  await step('mute shows on the others', async () => {
    await waitForTiles(cat, 2);
    await ann.click('#mic');
    await ann.click('#camera');
    for (const [page, name] of /** @type {[Page, string][]} */ ([[bob, 'Bob'], [cat, 'Cat']])) {
      const shown = await page
        .waitForFunction(
          () => {
            const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === 'Ann');
            return !!tile && 'micMuted' in /** @type {HTMLElement} */ (tile).dataset && 'noVideo' in /** @type {HTMLElement} */ (tile).dataset;
          },
          null,
          { timeout: 10_000 },
        )
        .then(() => true)
        .catch(() => false);
      check(`${name} sees Ann's microphone muted and camera off`, shown);
    }
    await ann.click('#mic');
    const unmuted = await bob
      .waitForFunction(
        () => {
          const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === 'Ann');
          return !!tile && !('micMuted' in /** @type {HTMLElement} */ (tile).dataset);
        },
        null,
        { timeout: 10_000 },
      )
      .then(() => true)
      .catch(() => false);
    check('Bob sees Ann unmute', unmuted);
    await bob.screenshot({ path: path.join(outDir, 'app-muted.png') });
  });

  await step('leave removes the tile', async () => {
    await cat.click('#leave');
    await Promise.all([waitForTiles(ann, 1), waitForTiles(bob, 1)]);
    check('when Cat leaves, Ann and Bob drop Cat\'s tile', true);
    check('Cat sees the join form again', await cat.locator('#join-form').isVisible());
  });

  await step('a server restart is survived by reconnecting', async () => {
    for (const page of [ann, bob]) {
      await page.evaluate(() => {
        const w = /** @type {any} */ (window);
        w.__events = [];
        for (const type of ['reconnecting', 'reconnected', 'disconnected']) {
          w.__switchboard.on(type, () => w.__events.push(type));
        }
      });
    }
    const { exitCode } = await restartServer();
    const restartedAt = Date.now();
    check('the server exits 0 on SIGTERM and starts again on the same port', exitCode === 0, `exit code ${exitCode}`);
    for (const [page, name, other] of /** @type {[Page, string, string][]} */ ([[ann, 'Ann', 'Bob'], [bob, 'Bob', 'Ann']])) {
      // Polled from here: the predicate reads stats, which is asynchronous.
      const deadline = Date.now() + 30_000;
      let back = false;
      while (!back && Date.now() < deadline) {
        back = await page.evaluate(async (otherName) => {
          const room = /** @type {any} */ (window).__switchboard;
          if (room?.state !== 'joined') return false;
          const peer = [...room.participants.values()].find((p) => p.name === otherName);
          const camera = peer && [...peer.tracks.values()].find((t) => t.kind === 'video');
          if (!camera) return false;
          for (const s of (await camera.receiver.getStats()).values()) {
            if (s.type === 'inbound-rtp' && s.framesDecoded > 0) return true;
          }
          return false;
        }, other);
        if (!back) await new Promise((r) => setTimeout(r, 200));
      }
      const events = await page.evaluate(() => /** @type {any} */ (window).__events.join(' → '));
      check(
        `${name} reconnects by itself and decodes ${other}'s video again`,
        back && events === 'reconnecting → reconnected',
        `events: ${events}; back ${((Date.now() - restartedAt) / 1000).toFixed(1)} s after the restart`,
      );
    }
    const errorShown = await ann.locator('#error').isVisible();
    check('no error is left on screen after reconnecting', !errorShown, (await ann.locator('#error').textContent()) ?? '');
    await ann.screenshot({ path: path.join(outDir, 'app-reconnected.png') });
  });
}

await run(main, TOTAL_TIMEOUT_MS);

// End-to-end test of the meeting app as a person uses it: the join screen (preview, devices,
// remembered fields, invite link), chat (also for a late joiner), the active speaker, mute shown
// on the others, the participant list, the connection badge, a screen share shown large, a
// phone-sized window, understandable errors, leaving, and a server restart survived.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/app.mjs
// Environment: see harness.mjs.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { connect as tcpConnect, createServer as createTcpServer } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { check, fakeScreenPicker, fetchRooms, launchBrowser, openPage, outDir, restartServer, run, sleep, startServer, step, stopServer } from './harness.mjs';

const ROOM = 'Standup';
const TOTAL_TIMEOUT_MS = 150_000;
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
 * Resolves true when `predicate(arg)` holds in the page within `timeoutMs`, false otherwise.
 * @template T
 * @param {Page} page
 * @param {(arg: T) => boolean} predicate
 * @param {T} arg
 * @param {number} [timeoutMs]
 */
const eventually = (page, predicate, arg, timeoutMs = 10_000) =>
  page
    .waitForFunction(predicate, arg, { timeout: timeoutMs })
    .then(() => true)
    .catch(() => false);

/**
 * The data attributes of the remote tile labelled `name`, or null.
 * @param {string} name
 */
function tileState(name) {
  const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === name);
  return tile ? { ...(/** @type {HTMLElement} */ (tile).dataset) } : null;
}

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

  const ann = await openPage('ann', base, `${base}/`, fakeScreenPicker);
  await step('the join screen previews the camera', async () => {
    const shown = await eventually(ann, () => {
      const video = /** @type {HTMLVideoElement} */ (document.getElementById('preview'));
      return video.readyState >= 2 && video.videoWidth > 0;
    }, null);
    const devices = await ann.evaluate(() => ({
      cameras: /** @type {HTMLSelectElement} */ (document.getElementById('camera-select')).options.length,
      microphones: /** @type {HTMLSelectElement} */ (document.getElementById('mic-select')).options.length,
    }));
    check('the join screen shows a live camera preview before joining', shown);
    check('the camera and microphone can be chosen', devices.cameras >= 1 && devices.microphones >= 1, JSON.stringify(devices));
    await ann.screenshot({ path: path.join(outDir, 'app-join.png') });
  });
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
    check("Ann and Bob each see the other's tile, by name", labels[0] === 'Bob' && labels[1] === 'Ann', labels.join(', '));
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
    await cat.click('#chat-toggle');
  });

  await step('the active speaker is highlighted', async () => {
    await waitForTiles(cat, 2);
    // Only Ann's (fake, beeping) microphone stays on.
    await bob.click('#mic');
    await cat.click('#mic');
    const onCat = await eventually(cat, (n) => {
      const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === n);
      return !!tile && 'speaking' in /** @type {HTMLElement} */ (tile).dataset;
    }, 'Ann');
    const bobNotSpeaking = await cat.evaluate(tileState, 'Bob');
    check("Ann, the only one with sound, is highlighted as the speaker on Cat's page", onCat && !('speaking' in (bobNotSpeaking ?? {})));
    await bob.click('#mic');
    await cat.click('#mic');
  });

  await step('mute shows on the others', async () => {
    await ann.click('#mic');
    await ann.click('#camera');
    for (const [page, name] of /** @type {[Page, string][]} */ ([[bob, 'Bob'], [cat, 'Cat']])) {
      const shown = await eventually(page, (n) => {
        const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === n);
        const data = /** @type {HTMLElement | undefined} */ (tile)?.dataset;
        return !!data && 'micMuted' in data && 'noVideo' in data;
      }, 'Ann');
      check(`${name} sees Ann's microphone muted and camera off`, shown);
    }
    await bob.click('#people-toggle');
    const listed = await eventually(bob, () => {
      const items = [...document.querySelectorAll('#people-list li')];
      const ann = items.find((li) => li.textContent === 'Ann');
      return items.length === 3 && !!ann && 'micMuted' in /** @type {HTMLElement} */ (ann).dataset;
    }, null);
    check('the participant list shows all three, Ann as muted', listed, (await bob.locator('#people-list').textContent()) ?? '');
    await ann.click('#mic');
    await ann.click('#camera');
    const unmuted = await eventually(bob, (n) => {
      const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === n);
      return !!tile && !('micMuted' in /** @type {HTMLElement} */ (tile).dataset);
    }, 'Ann');
    check('Bob sees Ann unmute', unmuted);
    await bob.click('#people-toggle');
  });

  await step('the connection badge shows round trip, loss and bitrate', async () => {
    const shown = await eventually(bob, () => {
      const m = /(\d+) ms · [\d.]+% loss · ↑(\d+) ↓(\d+) kbit\/s/.exec(document.getElementById('quality')?.textContent ?? '');
      // Two cameras and microphones arrive, one of each leaves: hundreds of kbit/s both ways.
      return !!m && Number(m[2]) > 100 && Number(m[3]) > 100;
    }, null);
    check('Bob sees a connection badge with round trip, loss and bitrate', shown, (await bob.textContent('#quality')) ?? '');
  });

  await step('a screen share is shown large on the others', async () => {
    await ann.click('#share');
    for (const [page, name] of /** @type {[Page, string][]} */ ([[bob, 'Bob'], [cat, 'Cat']])) {
      const large = await eventually(page, () => {
        const stage = document.getElementById('stage');
        const video = /** @type {HTMLVideoElement} */ (document.getElementById('stage-video'));
        const tile = document.querySelector('.tile');
        if (!stage || stage.hidden || !tile || video.videoWidth === 0) return false;
        return stage.getBoundingClientRect().width > 1.5 * tile.getBoundingClientRect().width;
      }, null, 20_000);
      const label = await page.textContent('#stage-label');
      check(`${name} sees Ann's screen share large, above the tiles`, large && label === "Ann's screen", label ?? '');
    }
    await bob.screenshot({ path: path.join(outDir, 'app-screen-share.png') });
    check("Ann's share button says how to stop", (await ann.textContent('#share')) === 'Stop sharing');
    await ann.click('#share');
    const gone = await eventually(bob, () => !!document.getElementById('stage')?.hidden, null);
    check('when Ann stops sharing, the stage goes away', gone);
  });

  await step('a phone-sized window', async () => {
    await cat.setViewportSize({ width: 390, height: 844 });
    await sleep(300);
    const fits = await cat.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
    await cat.screenshot({ path: path.join(outDir, 'app-phone.png') });
    check('the call fits a 390 px wide window without sideways scrolling', fits);
  });

  await step('controls are reachable and named', async () => {
    const names = await ann.$$eval('#controls button', (buttons) => buttons.map((b) => b.textContent?.trim() ?? ''));
    await ann.focus('#mic');
    await ann.keyboard.press('Enter');
    const toggled = await ann.evaluate(() => /** @type {any} */ (window).__switchboard.microphoneEnabled === false);
    await ann.keyboard.press('Enter');
    check('every control is a named button, and the keyboard works them', names.every(Boolean) && toggled, names.join(', '));
  });

  await step('another camera can be picked during the call', async () => {
    const switched = await ann.evaluate(async () => {
      const room = /** @type {any} */ (window).__switchboard;
      const { cameras } = await (await import('/src/client.js')).listDevices();
      // The last fake camera (see harness.mjs).
      const other = cameras[cameras.length - 1];
      if (cameras.length < 2) return { cameras: cameras.length };
      await room.setDevice('videoinput', other.deviceId);
      return { cameras: cameras.length, now: room.localStream.getVideoTracks()[0].getSettings().deviceId === other.deviceId };
    });
    // Bob keeps decoding Ann's video, now from the other camera.
    const frames = () =>
      bob.evaluate(async () => {
        const room = /** @type {any} */ (window).__switchboard;
        const ann = [...room.participants.values()].find((p) => p.name === 'Ann');
        const camera = ann && [...ann.tracks.values()].find((t) => t.kind === 'video' && t.source === 'camera');
        if (!camera) return 0;
        for (const s of (await camera.receiver.getStats()).values()) if (s.type === 'inbound-rtp') return s.framesDecoded;
        return 0;
      });
    const before = await frames();
    await sleep(1500);
    const after = await frames();
    check('Ann switches to another camera and Bob keeps seeing her', !!switched.now && after > before, `${JSON.stringify(switched)}, Bob's frames ${before} -> ${after}`);
  });

  await step('a blocked camera or an unreachable server is explained', async () => {
    const denied = await openPage('denied', base, `${base}/?room=${ROOM}`, () => {
      navigator.mediaDevices.getUserMedia = async () => {
        throw new DOMException('Permission denied', 'NotAllowedError');
      };
    });
    const explained = await eventually(denied, () => /camera or microphone is blocked/.test(document.getElementById('error')?.textContent ?? ''), null);
    check('a blocked camera is explained before joining', explained, (await denied.textContent('#error')) ?? '');
    await joinFromForm(denied, 'Dee');
    const seen = await eventually(bob, () => [...document.querySelectorAll('.tile.remote .label')].some((l) => l.textContent === 'Dee'), null);
    check('without camera and microphone one still joins, to watch and listen', seen);
    await denied.click('#leave');
    // The server stops answering: the request for a token fails.
    await denied.route('**/auth/token', (route) => route.abort('connectionrefused'));
    await denied.click('#join-form button[type=submit]');
    const unreachable = await eventually(denied, () => /Cannot reach the server/.test(document.getElementById('error')?.textContent ?? ''), null);
    check('an unreachable server is explained', unreachable, (await denied.textContent('#error')) ?? '');
    await denied.context().close();
  });

  await step('a taken name gets an understandable error', async () => {
    const dup = await openPage('dup', base, `${base}/?room=${ROOM}&name=ANN&autojoin=1`);
    const shown = await eventually(dup, () => /already uses that name/.test(document.getElementById('error')?.textContent ?? ''), null, 15_000);
    // The camera preview restarts after the refusal: the error must still be there to read.
    await sleep(2000);
    const still = /already uses that name/.test((await dup.textContent('#error')) ?? '');
    check('a taken name says so in words (and shows the code), and stays on screen', shown && still, (await dup.textContent('#error')) ?? '');
    await dup.context().close();
  });

  await step('leave removes the tile', async () => {
    await cat.click('#leave');
    await Promise.all([waitForTiles(ann, 1), waitForTiles(bob, 1)]);
    check("when Cat leaves, Ann and Bob drop Cat's tile", true);
    check('Cat sees the join form again', await cat.locator('#join-form').isVisible());
    await cat.goto(`${base}/`);
    const remembered = [await cat.inputValue('#room'), await cat.inputValue('#name')];
    check('the join form remembers the room and name', remembered[0] === ROOM && remembered[1] === 'Cat', remembered.join(', '));
  });

  await step('the embedding example of docs/sdk.md works from another origin', async () => {
    const doc = readFileSync(path.join(path.dirname(fileURLToPath(import.meta.url)), '../../docs/sdk.md'), 'utf8');
    const snippet = /```html\n([\s\S]*?)```/.exec(doc)?.[1];
    if (!snippet) throw new Error('no html example in docs/sdk.md');
    const html = `<!doctype html><meta charset="utf-8"><title>Embed</title>\n${snippet.replaceAll('http://127.0.0.1:8080', base)}`;
    // Another origin (another port): the page a developer would paste the example into.
    const site = createServer((_req, res) => res.writeHead(200, { 'Content-Type': 'text/html' }).end(html));
    await new Promise((resolve) => site.listen(0, '127.0.0.1', () => resolve(undefined)));
    const address = /** @type {import('node:net').AddressInfo} */ (site.address());
    try {
      const host = await openPage('embed-host', base, `${base}/?room=demo&name=Host&autojoin=1`);
      const guest = await openPage('embed-guest', base, `http://127.0.0.1:${address.port}/`);
      const plays = await eventually(guest, () => {
        const video = /** @type {HTMLVideoElement | null} */ (document.querySelector('#switchboard video'));
        return !!video && video.videoWidth > 0 && !video.paused;
      }, null, 20_000);
      const audio = await guest.evaluate(() => document.querySelectorAll('#switchboard audio').length);
      check("the pasted example shows the other participant's video (and adds its audio)", plays && audio === 1, `audio elements: ${audio}`);
      const seen = await eventually(host, () => document.querySelectorAll('.tile.remote').length === 1, null);
      check('the app sees the embedded guest', seen);
      await guest.context().close();
      await host.context().close();
    } finally {
      site.close();
    }
  });

  await step('a network drop is survived by reconnecting', async () => {
    // A proxy between a page and the server's HTTP port. "Dropping the network" resets the
    // page's side of every connection while the server's side stays open and silent, as when
    // a laptop changes networks: the server still counts the old session in the room.
    const { port: serverPort } = new URL(base);
    /** @type {Set<{client: import('node:net').Socket, upstream: import('node:net').Socket}>} */
    const pairs = new Set();
    const proxy = createTcpServer((client) => {
      const upstream = tcpConnect(Number(serverPort), '127.0.0.1');
      const pair = { client, upstream };
      pairs.add(pair);
      client.pipe(upstream);
      upstream.pipe(client);
      const forget = () => pairs.delete(pair);
      client.on('error', forget);
      upstream.on('error', forget);
      client.on('close', forget);
    });
    await new Promise((resolve) => proxy.listen(0, '127.0.0.1', () => resolve(undefined)));
    const proxyBase = `http://127.0.0.1:${/** @type {import('node:net').AddressInfo} */ (proxy.address()).port}`;
    try {
      const roamer = await openPage('roamer', proxyBase, `${proxyBase}/?room=${ROOM}&name=Roamer&autojoin=1`);
      await roamer.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 15_000 });
      await waitForTiles(bob, 2);
      await roamer.evaluate(() => {
        const w = /** @type {any} */ (window);
        w.__events = [];
        for (const type of ['reconnecting', 'reconnected', 'disconnected']) w.__switchboard.on(type, () => w.__events.push(type));
      });
      const dropped = Date.now();
      for (const { client, upstream } of pairs) {
        upstream.unpipe(client);
        client.unpipe(upstream);
        client.resetAndDestroy();
        upstream.pause(); // held open, unread: the server hears nothing more
      }
      const back = await eventually(roamer, () => /** @type {any} */ (window).__events.includes('reconnected'), null, 20_000);
      const events = await roamer.evaluate(() => /** @type {any} */ (window).__events.join(' → '));
      check('after a network drop the page reconnects by itself', back && events === 'reconnecting → reconnected', `events: ${events}, ${((Date.now() - dropped) / 1000).toFixed(1)} s`);
      // The server took the new connection for the same person at once: no ghost for 7 s.
      const seen = await eventually(bob, () => [...document.querySelectorAll('.tile.remote .label')].filter((l) => l.textContent === 'Roamer').length === 1, null, 5000);
      const room = await (await fetchRooms(base)).json();
      const roamers = room.rooms.find((/** @type {any} */ r) => r.name === ROOM)?.participants.filter((/** @type {any} */ p) => p.name === 'Roamer').length;
      check('the others see Roamer once, and the server holds one Roamer, not a ghost', seen && roamers === 1, `server: ${roamers} Roamer(s), ${((Date.now() - dropped) / 1000).toFixed(1)} s after the drop`);
      const media = await eventually(bob, () => {
        const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === 'Roamer');
        const video = /** @type {HTMLVideoElement | null | undefined} */ (tile?.querySelector('video'));
        return !!video && video.videoWidth > 0 && !('noVideo' in /** @type {HTMLElement} */ (tile).dataset);
      }, null, 15_000);
      check("Bob sees Roamer's video again", media);
      await roamer.context().close();
    } finally {
      for (const { client, upstream } of pairs) {
        client.destroy();
        upstream.destroy();
      }
      proxy.close();
    }
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
        if (!back) await sleep(200);
      }
      const events = await page.evaluate(() => /** @type {any} */ (window).__events.join(' → '));
      check(
        `${name} reconnects by itself and decodes ${other}'s video again`,
        back && events === 'reconnecting → reconnected',
        `events: ${events}; back ${((Date.now() - restartedAt) / 1000).toFixed(1)} s after the restarted server answered`,
      );
    }
    const errorShown = await ann.locator('#error').isVisible();
    check('no error is left on screen after reconnecting', !errorShown, (await ann.locator('#error').textContent()) ?? '');
    await ann.screenshot({ path: path.join(outDir, 'app-reconnected.png') });
  });

  await step('an admin removes a participant, who is told and stays out', async () => {
    const annId = await ann.evaluate(() => /** @type {any} */ (window).__switchboard.participantId);
    const minted = await fetch(`${base}/auth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ userId: 'host', room: ROOM, grants: { roomAdmin: true } }),
    });
    const { token } = await minted.json();
    // First the host mutes Ann's microphone: her page turns it off and says so.
    const micId = await bob.evaluate((id) => {
      const ann = /** @type {any} */ (window).__switchboard.participants.get(id);
      return [...(ann?.tracks.values() ?? [])].find((t) => t.kind === 'audio')?.trackId;
    }, annId);
    const muteRes = await fetch(`${base}/api/rooms/${encodeURIComponent(ROOM)}/participants/${annId}/mute`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ trackId: micId }),
    });
    const micOff = await eventually(ann, () => /** @type {any} */ (window).__switchboard.microphoneEnabled === false, null, 5000);
    const notice = (await ann.textContent('#status')) ?? '';
    check("POST .../mute turns Ann's microphone off on her page, which says so", muteRes.status === 204 && micOff && /muted your microphone/.test(notice), `status ${muteRes.status}, mic id ${micId}, "${notice}"`);
    const res = await fetch(`${base}/api/rooms/${encodeURIComponent(ROOM)}/participants/${annId}`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${token}` },
    });
    check('DELETE /api/rooms/{room}/participants/{id} with a roomAdmin token removes Ann', res.status === 204, `status ${res.status}`);
    const told = await eventually(ann, () => /removed you|were removed/.test(document.getElementById('error')?.textContent ?? ''), null, 10_000);
    check("Ann's page says she was removed", told, (await ann.textContent('#error')) ?? '');
    const gone = await eventually(bob, () => ![...document.querySelectorAll('.tile.remote .label')].some((l) => l.textContent === 'Ann'), null, 10_000);
    // Ann's page must not reconnect by itself: that would undo the admin's action.
    await sleep(3000);
    const state = await ann.evaluate(() => /** @type {any} */ (window).__switchboard?.state);
    const back = await bob.evaluate(() => [...document.querySelectorAll('.tile.remote .label')].some((l) => l.textContent === 'Ann'));
    check("Bob drops Ann's tile, and Ann does not come back by herself", gone && !back && state === 'closed', `Ann's room state: ${state}`);
  });

  await step('with API keys, the app joins from a link that carries a token, and only so', async () => {
    for (const page of [bob, cat]) await page.context().close();
    await stopServer();
    const secret = 'a-secret-of-at-least-thirty-two-bytes';
    process.env.SWITCHBOARD_API_KEYS = `{backend="${secret}"}`;
    const keyed = await startServer('app-keyed.log', []);
    delete process.env.SWITCHBOARD_API_KEYS;
    const minted = await fetch(`${keyed}/auth/token`, {
      method: 'POST',
      headers: { authorization: `Basic ${btoa(`backend:${secret}`)}`, 'content-type': 'application/json' },
      body: JSON.stringify({ userId: 'zed', room: 'Vault' }),
    });
    const { token } = await minted.json();
    const stranger = await openPage('stranger', keyed, `${keyed}/?room=Vault&name=Nobody&autojoin=1`);
    const refused = await eventually(stranger, () => /not allowed/.test(document.getElementById('error')?.textContent ?? ''), null, 15_000);
    check('a page without a token is told it is not allowed (the server mints none for pages)', refused, (await stranger.textContent('#error')) ?? '');
    const zed = await openPage('zed', keyed, `${keyed}/?room=Vault&name=Zed&autojoin=1&token=${encodeURIComponent(token)}`);
    const joined = await zed
      .waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 15_000 })
      .then(
        () => true,
        () => false,
      );
    check('a page opened from a link with a backend-minted token joins', minted.status === 200 && joined, `mint status ${minted.status}`);

    // A link for watching only: the token denies publishing.
    const viewing = await fetch(`${keyed}/auth/token`, {
      method: 'POST',
      headers: { authorization: `Basic ${btoa(`backend:${secret}`)}`, 'content-type': 'application/json' },
      body: JSON.stringify({ userId: 'yan', room: 'Vault', grants: { publish: false } }),
    });
    const viewerToken = (await viewing.json()).token;
    const yan = await openPage('yan', keyed, `${keyed}/?room=Vault&name=Yan&autojoin=1&token=${encodeURIComponent(viewerToken)}`, () => {
      const w = /** @type {any} */ (window);
      w.__cameraRequests = 0;
      const original = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
      navigator.mediaDevices.getUserMedia = (constraints) => (w.__cameraRequests++, original(constraints));
    });
    const seesZed = await eventually(yan, () => {
      const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === 'Zed');
      const video = /** @type {HTMLVideoElement | null | undefined} */ (tile?.querySelector('video'));
      return !!video && video.videoWidth > 0;
    }, null, 20_000);
    const viewer = await yan.evaluate(() => ({
      requests: /** @type {any} */ (window).__cameraRequests,
      localTile: !!document.querySelector('.tile.local'),
      buttons: ['mic', 'camera', 'share'].filter((id) => !document.getElementById(id)?.hidden),
      status: document.getElementById('status')?.textContent ?? '',
    }));
    check(
      'a viewer link joins without asking for a camera, offers nothing to send, and decodes the others',
      seesZed && viewer.requests === 0 && !viewer.localTile && viewer.buttons.length === 0 && /watching only/.test(viewer.status),
      JSON.stringify(viewer),
    );
    const zedMode = await zed.evaluate(() => /** @type {any} */ (window).__switchboard?.mode);
    check('the room of two with a viewer runs through the server', zedMode === 'sfu', `Zed's mode: ${zedMode}`);
    for (const page of [stranger, zed, yan]) await page.context().close();
  });
}

await run(main, TOTAL_TIMEOUT_MS);

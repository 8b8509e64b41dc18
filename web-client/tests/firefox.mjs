// End-to-end test with Firefox ESR beside Chromium, running the meeting app: an SFU room
// (--mesh-max 0) and a mesh room, each page decoding the other; a Firefox screen share shown on
// the Chromium page's stage; each browser's simulcast layers received by the other at the size
// it shows them; Firefox mute and camera-off shown on the Chromium page (and the
// other way round); a screen share the browser refuses explained in words.
// Firefox's SDP names its tracks by ids of its own (`a=msid` is not `MediaStreamTrack.id`), so
// this is where a server that matched tracks by msid alone shows a screen share as a camera.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/firefox.mjs
// Environment: see harness.mjs.
import path from 'node:path';
import {
  check,
  fakeScreenPicker,
  launchBrowser,
  launchFirefox,
  openFirefoxPage,
  openPage,
  outDir,
  run,
  sleep,
  startServer,
  step,
  stopServer,
  until,
  videoOf,
} from './harness.mjs';

const TOTAL_TIMEOUT_MS = 170_000;

/** @typedef {import('playwright-core').Page | import('puppeteer-core').Page} AnyPage */

/**
 * Checks that `viewer` decodes `name`'s video (or the stage): a picture, and frames that keep
 * coming.
 * @param {AnyPage} viewer
 * @param {string} viewerName
 * @param {string | null} name
 * @param {string} what
 */
async function checkDecodes(viewer, viewerName, name, what) {
  const shown = await until(viewer, async (n) => {
    const v = await /** @type {any} */ (window).__videoOf(n);
    return v.width > 0 && v.frames > 0;
  }, name);
  // @ts-ignore
  const before = await viewer.evaluate((n) => window.__videoOf(n), name);
  await sleep(1500);
  // @ts-ignore
  const after = await viewer.evaluate((n) => window.__videoOf(n), name);
  const growing = after.frames > before.frames + 5;
  check(`${viewerName} decodes ${what}`, shown && growing, `${after.width} px wide, ${after.frames - before.frames} frames in 1.5 s`);
}

/**
 * The data attributes of the remote tile labelled `name`.
 * @param {string} name
 */
function tileData(name) {
  const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === name);
  return tile ? { ...(/** @type {HTMLElement} */ (tile).dataset) } : null;
}

/**
 * Mutes the microphone and turns the camera off on `page`; checks the other page shows both,
 * then turns them back on and checks that shows too.
 * @param {AnyPage} page
 * @param {string} name
 * @param {AnyPage} other
 * @param {string} otherName
 */
async function checkMuteShown(page, name, other, otherName) {
  await page.click('#mic');
  await page.click('#camera');
  const shown = await until(other, (n) => {
    const t = /** @type {any} */ (window).__tileData(n);
    return !!t && 'micMuted' in t && 'noVideo' in t;
  }, name, 10_000);
  check(`${otherName} sees ${name}'s microphone muted and camera off`, shown, JSON.stringify(await other.evaluate(tileData, name)));
  await page.click('#mic');
  await page.click('#camera');
  const back = await until(other, (n) => {
    const t = /** @type {any} */ (window).__tileData(n);
    return !!t && !('micMuted' in t) && !('noVideo' in t);
  }, name, 10_000);
  check(`${otherName} sees ${name} unmute and turn the camera back on`, back);
}

/**
 * In the page: the camera's simulcast layers as sent so far (`outbound-rtp` with a rid; a layer
 * nobody watches is paused, its width then 0).
 * @returns {Promise<{rid: string, width: number, bytes: number}[]>}
 */
async function sentLayers() {
  const room = /** @type {any} */ (window).__switchboard;
  const camera = room.localStream?.getVideoTracks()[0];
  const sender = room.publishPc?.getSenders().find((/** @type {RTCRtpSender} */ s) => s.track === camera);
  if (!sender) return [];
  const out = [];
  for (const s of (await sender.getStats()).values()) {
    if (s.type === 'outbound-rtp' && s.rid) out.push({ rid: s.rid, width: s.frameWidth ?? 0, bytes: s.bytesSent ?? 0 });
  }
  return out.sort((a, b) => a.rid.localeCompare(b.rid));
}

/**
 * In the page: the width of the frames received for `name`'s camera through the server.
 * @param {string} name
 */
async function receivedWidth(name) {
  const room = /** @type {any} */ (window).__switchboard;
  const peer = [...room.participants.values()].find((p) => p.name === name);
  const camera = [...(peer?.tracks.values() ?? [])].find((/** @type {any} */ t) => t.source === "camera" && t.path === "sfu");
  if (!camera?.receiver) return 0;
  let width = 0;
  for (const s of (await camera.receiver.getStats()).values()) {
    if (s.type === 'inbound-rtp' && s.kind === 'video') width = s.frameWidth ?? 0;
  }
  return width;
}

/**
 * In the page: shows `name`'s camera at `width` x `height` as far as the server is told (the
 * tile is no longer observed), or observes the tile again for no size.
 * @param {{name: string, size: [number, number] | null}} arg
 */
function sizeVideo({ name, size }) {
  const room = /** @type {any} */ (window).__switchboard;
  const peer = [...room.participants.values()].find((p) => p.name === name);
  const video = [...document.querySelectorAll('.tile.remote')]
    .find((t) => t.querySelector('.label')?.textContent === name)
    ?.querySelector('video');
  if (!peer || !video) return false;
  if (size) {
    room.unobserveVideo(video);
    room.setVideoSize(peer.peerId, 'camera', size[0], size[1]);
  } else {
    room.setVideoSize(peer.peerId, 'camera', 0, 0);
    room.observeVideo(video, peer.peerId, 'camera');
  }
  return true;
}

/**
 * Checks that `publisher` sends its camera in several layers, that `viewer` receives a lower one
 * while it shows that camera small and the top one once it shows it large.
 * @param {AnyPage} publisher
 * @param {string} publisherName  as labelled on tiles
 * @param {string} publisherLabel
 * @param {AnyPage} viewer
 * @param {string} viewerLabel
 */
async function checkLayersFollowSize(publisher, publisherName, publisherLabel, viewer, viewerLabel) {
  /** @type {{rid: string, width: number, bytes: number}[]} */
  let layers = [];
  // Watched large, so the server wants the top layer: a layer nobody watches may be paused
  // before the publisher's bandwidth estimate ever let it start (Firefox starts low).
  // @ts-ignore
  await viewer.evaluate(sizeVideo, { name: publisherName, size: [1280, 720] });
  const layered = await until(publisher, async () => {
    const sent = await /** @type {any} */ (window).__sentLayers();
    return sent.length >= 2 && sent.every((/** @type {any} */ l) => l.bytes > 0);
  }, null, 20_000);
  // @ts-ignore
  layers = await publisher.evaluate(() => window.__sentLayers());
  // The top layer is the camera's own size.
  const full = await publisher.evaluate(
    () => /** @type {any} */ (window).__switchboard.localStream?.getVideoTracks()[0]?.getSettings().width ?? 0,
  );
  check(`${publisherLabel} sends its camera in simulcast layers`, layered, `${JSON.stringify(layers)}, camera ${full} px wide`);
  if (!layered) return;
  // @ts-ignore
  await viewer.evaluate(sizeVideo, { name: publisherName, size: [80, 60] });
  const started = Date.now();
  const lowered = await until(viewer, async (arg) => {
    const width = await /** @type {any} */ (window).__receivedWidth(arg.name);
    return width > 0 && width < arg.full;
  }, { name: publisherName, full }, 10_000);
  // @ts-ignore
  const low = await viewer.evaluate((n) => window.__receivedWidth(n), publisherName);
  check(`${viewerLabel} shows ${publisherLabel}'s camera small and receives a lower layer`, lowered, `${low} of ${full} px, after ${Date.now() - started} ms`);
  // @ts-ignore
  await viewer.evaluate(sizeVideo, { name: publisherName, size: [1280, 720] });
  const raisedAt = Date.now();
  const raised = await until(viewer, async (arg) => (await /** @type {any} */ (window).__receivedWidth(arg.name)) >= arg.full, { name: publisherName, full }, 10_000);
  // @ts-ignore
  const high = await viewer.evaluate((n) => window.__receivedWidth(n), publisherName);
  check(`${viewerLabel} shows it large and receives the top layer`, raised, `${high} of ${full} px, after ${Date.now() - raisedAt} ms`);
  // @ts-ignore
  await viewer.evaluate(sizeVideo, { name: publisherName, size: null });
}

/** Installed into every page: the helpers above, callable from evaluate. */
function installHelpers() {
  /** @type {any} */ (window).__videoOf = videoOf;
  /** @type {any} */ (window).__tileData = tileData;
  /** @type {any} */ (window).__sentLayers = sentLayers;
  /** @type {any} */ (window).__receivedWidth = receivedWidth;
}

// Installed as source, so the helpers exist in the page's own realm.
const helpersScript = new Function(
  `${videoOf.toString()}\n${tileData.toString()}\n${sentLayers.toString()}\n${receivedWidth.toString()}\n(${installHelpers.toString()})();`,
);

/**
 * Waits until the page has joined in `mode`.
 * @param {AnyPage} page
 * @param {string} name
 * @param {'mesh' | 'sfu'} mode
 */
async function joined(page, name, mode) {
  const ok = await until(page, (m) => {
    const room = /** @type {any} */ (window).__switchboard;
    return room?.state === 'joined' && room.mode === m;
  }, mode);
  check(`${name} joins a ${mode} room`, ok);
  return ok;
}

async function main() {
  await launchBrowser();
  await launchFirefox();

  // --- an SFU room: Fay (Firefox) and Cid (Chromium) -------------------------------------------
  const base = await startServer('server-firefox-sfu.log', ['--mesh-max', '0']);
  check('server starts (every room an SFU room)', true, base);
  const fay = await openFirefoxPage('fay', `${base}/?room=ffsfu&name=Fay&autojoin=1`, fakeScreenPicker);
  await fay.evaluate(helpersScript);
  const cid = await openPage('cid', base, `${base}/?room=ffsfu&name=Cid&autojoin=1`, helpersScript);
  if ((await joined(fay, 'Fay (Firefox)', 'sfu')) && (await joined(cid, 'Cid (Chromium)', 'sfu'))) {
    await step('SFU: each decodes the other', async () => {
      await checkDecodes(cid, 'Cid (Chromium)', 'Fay', "Fay's Firefox camera through the server");
      await checkDecodes(fay, 'Fay (Firefox)', 'Cid', "Cid's Chromium camera through the server");
    });
    await step('SFU: simulcast both ways: each receives the layer its view needs', async () => {
      await checkLayersFollowSize(fay, 'Fay', 'Fay (Firefox)', cid, 'Cid (Chromium)');
      await checkLayersFollowSize(cid, 'Cid', 'Cid (Chromium)', fay, 'Fay (Firefox)');
    });
    await step('SFU: the server hears Firefox speak', async () => {
      // Firefox's fake microphone is a steady tone; the server reads its audio-level extension.
      const heard = await until(cid, () => {
        const room = /** @type {any} */ (window).__switchboard;
        const fay = [...room.participants.values()].find((p) => p.name === 'Fay');
        return !!fay && room.speakers.some((/** @type {any} */ s) => s.peerId === fay.peerId);
      }, null, 10_000);
      check("Cid is told Fay (Firefox) speaks, from the server's speakers", heard);
    });
    await step('SFU: a Firefox screen share is shown on stage', async () => {
      await fay.click('#share');
      const onStage = await until(cid, () => {
        const stage = document.getElementById('stage');
        return !!stage && !stage.hidden && document.getElementById('stage-label')?.textContent === "Fay's screen";
      }, null);
      const label = await cid.evaluate(() => document.getElementById('stage-label')?.textContent ?? '');
      check("Cid sees Fay's Firefox screen share on stage, as a screen", onStage, label);
      // A share taken for a second camera would replace Fay's camera in her tile.
      // @ts-ignore
      const tile = await cid.evaluate(() => window.__videoOf('Fay'));
      // @ts-ignore
      const staged = await cid.evaluate(() => window.__videoOf(null));
      check("Fay's tile still shows her camera, not the share", tile.width > 0 && tile.trackId !== staged.trackId, `${tile.trackId} / ${staged.trackId}`);
      await checkDecodes(cid, 'Cid (Chromium)', null, "Fay's screen share on stage");
      await cid.screenshot({ path: path.join(outDir, 'firefox-share-on-chromium.png') });
      // Firefox keeps the stopped section's `a=ssrc` lines (port 0, inactive): the server must
      // still end the publication.
      await fay.click('#share');
      const gone = await until(cid, () => !!document.getElementById('stage')?.hidden, null, 10_000);
      check("when Fay stops sharing, Cid's stage goes away", gone);
    });
    await step('SFU: Firefox mute shows', () => checkMuteShown(fay, 'Fay', cid, 'Cid'));
    await step('SFU: Chromium mute shows in Firefox', () => checkMuteShown(cid, 'Cid', fay, 'Fay'));
    await fay.screenshot({ path: path.join(outDir, 'firefox-sfu.png') });
  }
  await fay.close();
  await cid.close();
  check('the SFU room\'s server exits 0 on SIGTERM', (await stopServer()) === 0);

  // --- a mesh room: Fey (Firefox, no screen to share) and Cal (Chromium) ------------------------
  const meshBase = await startServer('server-firefox-mesh.log', []);
  const fey = await openFirefoxPage('fey', `${meshBase}/?room=ffmesh&name=Fey&autojoin=1`);
  await fey.evaluate(helpersScript);
  const cal = await openPage('cal', meshBase, `${meshBase}/?room=ffmesh&name=Cal&autojoin=1`, helpersScript);
  if ((await joined(fey, 'Fey (Firefox)', 'mesh')) && (await joined(cal, 'Cal (Chromium)', 'mesh'))) {
    await step('mesh: each decodes the other', async () => {
      await checkDecodes(cal, 'Cal (Chromium)', 'Fey', "Fey's Firefox camera peer to peer");
      await checkDecodes(fey, 'Fey (Firefox)', 'Cal', "Cal's Chromium camera peer to peer");
    });
    await step('mesh: Firefox mute shows', () => checkMuteShown(fey, 'Fey', cal, 'Cal'));
    await step('a refused screen share is explained in words', async () => {
      // Headless Firefox with fake media has no screen to offer: getDisplayMedia fails.
      await fey.click('#share');
      const shown = await until(fey, () => !document.getElementById('error')?.hidden, null, 10_000);
      const text = await fey.evaluate(() => document.getElementById('error')?.textContent ?? '');
      check(
        'the app says why the screen cannot be shared, not the browser\'s raw message',
        shown && /screen/i.test(text) && !/object can not be found|\(\d+\)/i.test(text),
        text,
      );
      await fey.screenshot({ path: path.join(outDir, 'firefox-share-refused.png') });
    });
  }
}

run(main, TOTAL_TIMEOUT_MS);

// End-to-end test of simulcast through the server: one publisher sends its camera in three
// layers (q, h, f), four subscribers say how large they show it (the SDK's `view`), each gets
// the smallest layer that covers its size, and the publisher stops encoding the layers nobody
// needs (the server's `layers`). Five Chromium pages use the SDK directly, not the app.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/simulcast.mjs
// Environment: see harness.mjs (SWITCHBOARD_BIN, CLIENT_FROM_DISK=1 for an unbuilt client).
// Measurements are printed as JSON lines, each with "simulcast" naming it.
import { check, launchBrowser, openPage, run, sleep, startServer, step } from './harness.mjs';

const ROOM = 'simulcast';
// The server's default: the full layer's cap, and what the publisher's estimate climbs to.
const MAX_VIDEO_BITRATE = 2_500_000;
// Chromium sends three simulcast layers only from 960x540 up (fewer below: its
// WebRTC-LegacySimulcastLayerLimit, on by default); the fake camera gives 1280x720 when asked.
const CAMERA = { width: 1280, height: 720 };
const PUBLISHER = 'alice';
const SUBSCRIBERS = ['bob', 'cat', 'dan', 'eve'];
const TOTAL_TIMEOUT_MS = 200_000;

/** @typedef {import('playwright-core').Page} Page */

/** @param {Record<string, unknown>} fields */
const report = (fields) => console.log(JSON.stringify({ simulcast: fields.simulcast, ...fields }));

/**
 * Installed into every page before its scripts: every `view` sent and `layers` received, with
 * the page's time.
 */
function recordSignaling() {
  const w = /** @type {any} */ (window);
  w.__views = [];
  w.__layers = [];
  const send = WebSocket.prototype.send;
  /** @param {string | ArrayBufferLike | Blob | ArrayBufferView} data */
  WebSocket.prototype.send = function (data) {
    try {
      const msg = JSON.parse(String(data));
      if (msg.type === 'view') w.__views.push({ ...msg, at: performance.now() });
    } catch {
      // not JSON: not ours
    }
    return send.call(this, data);
  };
  const Native = WebSocket;
  w.WebSocket = class extends Native {
    /** @param {ConstructorParameters<typeof WebSocket>} args */
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (ev) => {
        try {
          const msg = JSON.parse(String(ev.data));
          if (msg.type === 'layers') w.__layers.push({ ...msg, at: performance.now() });
        } catch {
          // not JSON
        }
      });
    }
  };
}

/**
 * In the page: joins `room` as `name` with the SDK, the publisher with a 1280x720 camera and a
 * microphone, the others with a microphone only.
 * @param {{room: string, name: string, camera: {width: number, height: number} | null}} arg
 */
async function joinRoom({ room, name, camera }) {
  const w = /** @type {any} */ (window);
  const sdk = await import('/src/client.js');
  const r = new sdk.Room();
  w.__room = r;
  w.__quality = null;
  r.on('connectionQuality', (/** @type {any} */ q) => (w.__quality = q));
  r.on('error', (/** @type {any} */ e) => console.error(`switchboard error ${e.code}: ${e.message}`));
  const stream = camera
    ? await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: { width: { exact: camera.width }, height: { exact: camera.height } },
      })
    : undefined;
  await r.connect(location.origin, { room, name, stream, audio: true, video: false });
  return { participantId: r.participantId, mode: r.mode, maxVideoBitrate: r.maxVideoBitrate };
}

/**
 * In the publisher's page: its camera's simulcast layers, from the publish connection's stats
 * and the sender's encodings.
 */
async function outboundLayers() {
  const room = /** @type {any} */ (window).__room;
  const pc = /** @type {RTCPeerConnection | null} */ (room?.publishPc);
  const camera = room?.localStream?.getVideoTracks()[0];
  const sender = pc?.getSenders().find((s) => s.track === camera);
  if (!pc || !sender) return null;
  /** @type {Record<string, any>} */
  const layers = {};
  for (const s of (await sender.getStats()).values()) {
    if (s.type !== 'outbound-rtp' || s.kind !== 'video') continue;
    layers[s.rid ?? '-'] = {
      bytesSent: s.bytesSent ?? 0,
      frameWidth: s.frameWidth ?? 0,
      frameHeight: s.frameHeight ?? 0,
      framesPerSecond: s.framesPerSecond ?? 0,
      statsActive: s.active ?? null,
      qualityLimitationReason: s.qualityLimitationReason ?? null,
      at: s.timestamp,
    };
  }
  const encodings = sender.getParameters().encodings.map((e) => ({
    rid: e.rid,
    active: e.active,
    scaleResolutionDownBy: e.scaleResolutionDownBy,
    maxBitrate: e.maxBitrate,
    scalabilityMode: /** @type {any} */ (e).scalabilityMode,
  }));
  const settings = camera.getSettings();
  return { layers, encodings, camera: { width: settings.width, height: settings.height } };
}

/**
 * In a subscriber's page: the inbound stats of `peerId`'s camera, or null before it is subscribed.
 * @param {string} peerId
 */
async function inboundVideo(peerId) {
  const room = /** @type {any} */ (window).__room;
  const participant = room?.participants.get(peerId);
  const remote = participant && [...participant.tracks.values()].find((t) => t.kind === 'video' && t.source === 'camera');
  if (!remote) return null;
  for (const s of (await remote.receiver.getStats()).values()) {
    if (s.type !== 'inbound-rtp') continue;
    return {
      frameWidth: s.frameWidth ?? 0,
      frameHeight: s.frameHeight ?? 0,
      framesDecoded: s.framesDecoded ?? 0,
      freezeCount: s.freezeCount ?? 0,
      totalFreezesDuration: s.totalFreezesDuration ?? 0,
      at: performance.now(),
    };
  }
  return null;
}

/**
 * In a subscriber's page: shows `peerId`'s camera in a <video> of the given CSS size, watched by
 * the SDK (room.observeVideo), or resizes the one already shown.
 * @param {{peerId: string, width: number, height: number}} arg
 */
function showVideo({ peerId, width, height }) {
  const room = /** @type {any} */ (window).__room;
  let video = /** @type {HTMLVideoElement | null} */ (document.getElementById('shown'));
  if (!video) {
    video = document.createElement('video');
    video.id = 'shown';
    video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    video.style.cssText = 'position: absolute; left: 0; top: 0; object-fit: cover; background: #000';
    document.body.append(video);
    const remote = [...room.participants.get(peerId).tracks.values()].find(
      (/** @type {any} */ t) => t.kind === 'video' && t.source === 'camera',
    );
    video.srcObject = new MediaStream([remote.track]);
    video.play().catch(() => {});
    room.observeVideo(video, peerId, 'camera');
  }
  video.style.width = `${width}px`;
  video.style.height = `${height}px`;
  return { devicePixelRatio, at: performance.now() };
}

/**
 * In a subscriber's page: resizes the shown video, then polls every 100 ms until `peerId`'s
 * camera arrives `wide` enough (`atLeast`) or narrow enough (`atMost`), or `timeoutMs` passes.
 * Freeze counters are read before, and `settleMs` after the switch.
 * @param {{peerId: string, width: number, height: number, atLeast?: number, atMost?: number, timeoutMs: number, settleMs: number}} arg
 */
async function resizeAndWait({ peerId, width, height, atLeast, atMost, timeoutMs, settleMs }) {
  const w = /** @type {any} */ (window);
  const stats = async () => {
    const room = w.__room;
    const participant = room?.participants.get(peerId);
    const remote = participant && [...participant.tracks.values()].find((/** @type {any} */ t) => t.kind === 'video' && t.source === 'camera');
    if (!remote) return null;
    for (const s of (await remote.receiver.getStats()).values()) {
      if (s.type === 'inbound-rtp') {
        return { frameWidth: s.frameWidth ?? 0, freezeCount: s.freezeCount ?? 0, totalFreezesDuration: s.totalFreezesDuration ?? 0 };
      }
    }
    return null;
  };
  const before = await stats();
  const video = /** @type {HTMLVideoElement} */ (document.getElementById('shown'));
  const viewsBefore = w.__views.length;
  const start = performance.now();
  video.style.width = `${width}px`;
  video.style.height = `${height}px`;
  const reached = (/** @type {any} */ s) =>
    !!s && s.frameWidth > 0 && (atLeast === undefined || s.frameWidth >= atLeast) && (atMost === undefined || s.frameWidth <= atMost);
  let now = await stats();
  /** @type {number | null} */
  let ms = null;
  while (performance.now() - start < timeoutMs) {
    if (reached(now)) {
      ms = performance.now() - start;
      break;
    }
    await new Promise((r) => setTimeout(r, 100));
    now = await stats();
  }
  await new Promise((r) => setTimeout(r, settleMs));
  const after = await stats();
  const view = w.__views.slice(viewsBefore)[0];
  return {
    ms,
    frameWidth: now?.frameWidth ?? 0,
    viewSentAfterMs: view ? Math.round(view.at - start) : null,
    newFreezes: (after?.freezeCount ?? 0) - (before?.freezeCount ?? 0),
    newFreezeSeconds: (after?.totalFreezesDuration ?? 0) - (before?.totalFreezesDuration ?? 0),
  };
}

/**
 * Polls the publisher until `done(sample, previous)` holds for two consecutive samples.
 * @param {Page} page
 * @param {(sample: any, previous: any) => boolean} done
 * @param {number} timeoutMs
 * @param {number} [everyMs]
 * @returns {Promise<{ms: number | null, sample: any, previousAt: number, sampleAt: number}>}  `ms`
 *   from the start to the sample that showed it (null: never), and when (Date.now()) the two
 *   samples were taken: what stopped, stopped by `previousAt`; what started, started by `sampleAt`
 */
async function pollPublisher(page, done, timeoutMs, everyMs = 250) {
  const start = Date.now();
  let previous = await page.evaluate(outboundLayers);
  let previousAt = Date.now();
  while (Date.now() - start < timeoutMs) {
    await sleep(everyMs);
    const sample = await page.evaluate(outboundLayers);
    const sampleAt = Date.now();
    if (sample && previous && done(sample, previous)) return { ms: sampleAt - start, sample, previousAt, sampleAt };
    previous = sample;
    previousAt = sampleAt;
  }
  return { ms: null, sample: previous, previousAt, sampleAt: previousAt };
}

/**
 * @param {any} sample
 * @param {any} previous
 * @param {string} rid
 * @returns {boolean} the layer sent bytes between the two samples
 */
const grows = (sample, previous, rid) =>
  (sample.layers[rid]?.bytesSent ?? 0) > (previous.layers[rid]?.bytesSent ?? 0);

/**
 * @param {any} sample
 * @param {string} rid
 * @returns {boolean | undefined} the sender's encoding `active` for the layer
 */
const encodingActive = (sample, rid) => sample.encodings.find((/** @type {any} */ e) => e.rid === rid)?.active;

/** @param {any} sample  one line per layer, for details */
const describe = (sample) =>
  ['q', 'h', 'f']
    .map((rid) => {
      const l = sample?.layers[rid];
      return l ? `${rid} ${l.frameWidth}x${l.frameHeight} ${Math.round(l.framesPerSecond)} fps active=${encodingActive(sample, rid)}` : `${rid} -`;
    })
    .join(', ') + ` (limited by: ${sample?.layers.q?.qualityLimitationReason ?? '?'})`;

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts and answers /healthz', async () => {
    base = await startServer('simulcast-server.log', ['--max-video-bitrate', `${MAX_VIDEO_BITRATE}`, '--mesh-max', '0']);
    check('server starts and answers /healthz', true, base);
  });
  if (!started) return;
  await launchBrowser();

  // A plain page of the server's origin (the SDK's modules and the token endpoint are there):
  // /healthz, whose "ok" Chromium shows in a <pre>.
  /** @param {string} name */
  const open = (name) => openPage(`simulcast-${name}`, base, `${base}/healthz`, recordSignaling);
  const pub = await open(PUBLISHER);
  const subs = await Promise.all(SUBSCRIBERS.map(open));
  const [bob, cat, dan, eve] = subs;

  const joined = await pub.evaluate(joinRoom, { room: ROOM, name: PUBLISHER, camera: CAMERA });
  const alice = String(joined.participantId);
  check(
    `${PUBLISHER} joins with a ${CAMERA.width}x${CAMERA.height} camera, and the server's video cap`,
    joined.mode === 'sfu' && joined.maxVideoBitrate === MAX_VIDEO_BITRATE,
    `mode ${joined.mode}, maxVideoBitrate ${joined.maxVideoBitrate}`,
  );
  await Promise.all(subs.map((page, i) => page.evaluate(joinRoom, { room: ROOM, name: SUBSCRIBERS[i], camera: null })));

  let receiving = false;
  await step(`every subscriber decodes ${PUBLISHER}'s camera`, async () => {
    const deadline = Date.now() + 30_000;
    let decoding = await Promise.all(subs.map((page) => page.evaluate(inboundVideo, alice)));
    while (!decoding.every((v) => (v?.framesDecoded ?? 0) > 0) && Date.now() < deadline) {
      await sleep(250);
      decoding = await Promise.all(subs.map((page) => page.evaluate(inboundVideo, alice)));
    }
    receiving = check(
      `every subscriber decodes ${PUBLISHER}'s camera`,
      decoding.every((v) => (v?.framesDecoded ?? 0) > 0),
      decoding.map((v, i) => `${SUBSCRIBERS[i]} ${v ? `${v.framesDecoded} frames, ${v.frameWidth} px wide` : 'not subscribed'}`).join(', '),
    );
  });
  if (!receiving) return;

  const first = await pub.evaluate(outboundLayers);
  const f = first?.encodings.find((e) => e.rid === 'f');
  check(
    `${PUBLISHER}'s camera is sent in three layers q, h, f, the full one capped at the server's maximum`,
    first?.encodings.map((e) => e.rid).join(',') === 'q,h,f' && f?.maxBitrate === MAX_VIDEO_BITRATE,
    `camera ${first?.camera.width}x${first?.camera.height}, encodings ${JSON.stringify(first?.encodings)}`,
  );
  report({ simulcast: 'encodings', camera: first?.camera, encodings: first?.encodings });

  // Every layer is needed by someone: bob shows it large (an element the SDK watches), cat at
  // half size, dan and eve small (sizes told with setVideoSize).
  await bob.evaluate(showVideo, { peerId: alice, width: 1280, height: 720 });
  await cat.evaluate((peerId) => /** @type {any} */ (window).__room.setVideoSize(peerId, 'camera', 480, 270), alice);
  for (const page of [dan, eve]) {
    await page.evaluate((peerId) => /** @type {any} */ (window).__room.setVideoSize(peerId, 'camera', 160, 90), alice);
  }

  // (a) Three layers, each sending. The publisher's estimate starts at 300 kbit/s and the full
  // layer is added once it covers the lower ones and the full one's minimum.
  /** The full layer's width while every layer is sent (less than the camera's when Chromium
   * scales the camera down for CPU or bandwidth). */
  let fullWidth = CAMERA.width;
  await step('(a) the publisher sends all three layers', async () => {
    const { ms, sample } = await pollPublisher(pub, (s, p) => ['q', 'h', 'f'].every((rid) => grows(s, p, rid)), 30_000, 1000);
    check(`(a) ${PUBLISHER}'s outbound video has layers q, h and f, each with bytesSent growing`, ms !== null, describe(sample));
    report({ simulcast: 'all_layers_sending', afterMs: ms, layers: sample?.layers });
    if (ms !== null) fullWidth = sample.layers.f?.frameWidth || fullWidth;
    const views = await Promise.all([bob, cat, dan, eve].map((p) => p.evaluate(() => /** @type {any} */ (window).__views.length)));
    report({ simulcast: 'views_sent', perSubscriber: Object.fromEntries(SUBSCRIBERS.map((n, i) => [n, views[i]])) });
  });

  await step('the SDK reports the layers and remote videos in connectionQuality', async () => {
    await sleep(2500);
    const sendLayers = await pub.evaluate(() => /** @type {any} */ (window).__quality?.sendLayers ?? []);
    const remoteVideos = await bob.evaluate(() => /** @type {any} */ (window).__quality?.remoteVideos ?? []);
    check(
      'connectionQuality.sendLayers lists q, h, f; remoteVideos has the video received',
      sendLayers.map((/** @type {any} */ l) => l.rid).join(',') === 'q,h,f' &&
        remoteVideos.some((/** @type {any} */ v) => v.peerId === alice && v.frameWidth > 0),
      `sendLayers ${JSON.stringify(sendLayers)}, remoteVideos ${JSON.stringify(remoteVideos)}`,
    );
  });

  // (b) bob shows alice small, then large again.
  await step('(b) a subscriber switches layers with its view', async () => {
    const down = await bob.evaluate(resizeAndWait, { peerId: alice, width: 160, height: 90, atMost: 400, timeoutMs: 5000, settleMs: 500 });
    report({ simulcast: 'switch_down', ...down });
    check(`(b) bob shows ${PUBLISHER} at 160x90 and receives at most 400 px wide within 5 s`, down.ms !== null, `${down.frameWidth} px after ${down.ms} ms`);
    await sleep(1000);
    // Nobody needs f now: the switch up includes the publisher turning it back on.
    const full = fullWidth;
    const up = await bob.evaluate(resizeAndWait, { peerId: alice, width: 1280, height: 720, atLeast: full, timeoutMs: 2000, settleMs: 1000 });
    report({ simulcast: 'switch_up', fullLayerWidth: full, ...up });
    check(
      `(b) bob shows ${PUBLISHER} at 1280x720 and receives the full layer (${full} px wide) within 2 s`,
      up.ms !== null,
      `${up.frameWidth} px after ${up.ms === null ? 'more than 2000' : Math.round(up.ms)} ms`,
    );
    check(
      '(b) switching up freezes for no more than 0.5 s',
      up.newFreezeSeconds <= 0.5,
      `${up.newFreezes} new freezes, ${up.newFreezeSeconds.toFixed(3)} s frozen`,
    );
  });

  // (c) Everybody shows alice small: only q is needed.
  await step('(c) layers nobody needs stop, and come back when needed', async () => {
    const layersBefore = await pub.evaluate(() => /** @type {any} */ (window).__layers.length);
    const smallAt = Date.now();
    await bob.evaluate(showVideo, { peerId: alice, width: 160, height: 90 });
    await cat.evaluate((peerId) => /** @type {any} */ (window).__room.setVideoSize(peerId, 'camera', 160, 90), alice);
    const stopped = await pollPublisher(
      pub,
      (s, p) => !grows(s, p, 'h') && !grows(s, p, 'f') && grows(s, p, 'q'),
      3000 + 1000,
      300,
    );
    const stopMs = stopped.ms === null ? null : stopped.previousAt - smallAt;
    report({ simulcast: 'layers_stop', ms: stopMs, layers: stopped.sample?.layers, encodings: stopped.sample?.encodings });
    check(
      `(c) with every view small, ${PUBLISHER}'s h and f stop sending within 3 s (q goes on)`,
      stopped.ms !== null && /** @type {number} */ (stopMs) <= 3000,
      `${describe(stopped.sample)}; after ${stopMs} ms`,
    );
    const told = await pub.evaluate((n) => /** @type {any} */ (window).__layers.slice(n), layersBefore);
    check(
      '(c) the server said so (`layers` q only) and the SDK turned h and f off',
      told.some((/** @type {any} */ m) => m.trackId && m.active.join(',') === 'q') &&
        encodingActive(stopped.sample, 'h') === false &&
        encodingActive(stopped.sample, 'f') === false,
      `layers ${JSON.stringify(told.map((/** @type {any} */ m) => m.active))}`,
    );

    const largeAt = Date.now();
    await bob.evaluate(showVideo, { peerId: alice, width: 1280, height: 720 });
    const back = await pollPublisher(pub, (s, p) => grows(s, p, 'f'), 3000 + 1000, 300);
    const backMs = back.ms === null ? null : back.sampleAt - largeAt;
    report({ simulcast: 'layers_back', ms: backMs, layers: back.sample?.layers, encodings: back.sample?.encodings });
    check(
      `(c) once bob shows ${PUBLISHER} large again, f sends again within 3 s`,
      back.ms !== null && /** @type {number} */ (backMs) <= 3000,
      `${describe(back.sample)}; after ${backMs} ms`,
    );
    // h: no subscriber's view needs it now (bob's is covered by f, the others by q); whether the
    // server turns it on too (as a fallback for bob) is its choice.
    report({ simulcast: 'h_after_large_view', active: encodingActive(back.sample, 'h') });
  });
}

await run(main, TOTAL_TIMEOUT_MS);

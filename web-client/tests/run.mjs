// End-to-end test of an SFU room: the real server binary and real Chromium pages running the
// demo app, every room an SFU room (--mesh-max 0). Mesh rooms and switching: mesh.mjs.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/run.mjs
// Environment: see harness.mjs.
import path from 'node:path';
import {
  check,
  fetchRooms,
  launchBrowser,
  openPage as openBrowserPage,
  outDir,
  run,
  serverCpuSeconds,
  sleep,
  startServer,
  step,
} from './harness.mjs';

const ROOM = 'e2e';
const PAGES = 4;
// Well above Chromium's 300 kbit/s starting estimate and well below what it would estimate on
// loopback unbounded: an estimate at this value shows both the ramp-up (driven by the server's
// transport-wide CC feedback) and the cap (the server's b=TIAS).
const MAX_VIDEO_BITRATE = 600_000;
const TOTAL_TIMEOUT_MS = 170_000;

/** Installed into every page: per remote participant, the inbound RTP stats of its media. */
function installStatsHelper() {
  // When each remote track was announced (setRemoteDescription of the subscribe offer).
  /** @type {Record<string, number>} */
  const trackAt = {};
  // @ts-ignore
  window.__e2eTrackAt = trackAt;
  const Native = window.RTCPeerConnection;
  // @ts-ignore
  window.RTCPeerConnection = class extends Native {
    /** @param {RTCConfiguration} [config] */
    constructor(config) {
      super(config);
      this.addEventListener('track', (e) => (trackAt[e.track.id] ??= performance.now()));
    }
  };
  /** @returns {Promise<Record<string, any>>} by participant name */
  // @ts-ignore
  window.__e2eRemoteStats = async () => {
    // @ts-ignore
    const room = window.__switchboard;
    const pc = room?.subscribePc;
    /** @type {Record<string, any>} */
    const out = {};
    if (!pc || pc.connectionState === 'closed') return out;
    for (const transceiver of pc.getTransceivers()) {
      const sub = transceiver.mid != null ? room.subscriptions.get(transceiver.mid) : undefined;
      if (!sub || !room.participants.has(sub.peerId)) continue;
      const name = room.participants.get(sub.peerId).name;
      const report = await transceiver.receiver.getStats();
      for (const s of report.values()) {
        if (s.type === 'remote-outbound-rtp') {
          // What the server's sender reports said: the stream's count and its wall clock.
          out[name] ??= { peerId: sub.peerId };
          out[name][`${s.kind}Reports`] = {
            reportsSent: s.reportsSent ?? 0,
            packetsSent: s.packetsSent ?? 0,
            clockOffsetMs: (s.remoteTimestamp ?? 0) - Date.now(),
          };
          continue;
        }
        if (s.type !== 'inbound-rtp') continue;
        out[name] ??= { peerId: sub.peerId };
        out[name][s.kind] = {
          trackIdentifier: s.trackIdentifier,
          framesDecoded: s.framesDecoded ?? 0,
          frameWidth: s.frameWidth ?? 0,
          packetsReceived: s.packetsReceived ?? 0,
          totalAudioEnergy: s.totalAudioEnergy ?? 0,
        };
      }
    }
    return out;
  };
}

/**
 * In the page: waits until `expected` remote videos have decoded a frame. Times are
 * milliseconds since the page's navigation started.
 * @param {{expected: number, timeoutMs: number}} arg
 */
async function firstFrameTimes({ expected, timeoutMs }) {
  const deadline = performance.now() + timeoutMs;
  /** @type {number | null} */
  let first = null;
  // Per remote: from its track being announced to its first decoded frame.
  /** @type {Record<string, number>} */
  const subscribedToFrame = {};
  while (performance.now() < deadline) {
    // @ts-ignore
    const stats = window.__e2eRemoteStats ? await window.__e2eRemoteStats() : {};
    const now = performance.now();
    for (const [name, entry] of Object.entries(stats)) {
      // @ts-ignore
      const announced = window.__e2eTrackAt?.[entry.video?.trackIdentifier];
      if (entry.video?.framesDecoded > 0 && announced != null) subscribedToFrame[name] ??= now - announced;
    }
    const decoding = Object.values(stats).filter((e) => e.video?.framesDecoded > 0).length;
    if (decoding > 0 && first === null) first = now;
    if (decoding >= expected) return { first, all: now, subscribedToFrame };
    await new Promise((r) => setTimeout(r, 25));
  }
  return { first, all: null, subscribedToFrame };
}

/** In the page: bytes and frames the publish connection has sent as video so far. */
async function publishedVideo() {
  // @ts-ignore
  const pc = window.__switchboard?.publishPc;
  if (!pc) return null;
  let bytesSent = 0;
  let available = 0;
  let layers = 0;
  for (const s of (await pc.getStats()).values()) {
    if (s.type === 'outbound-rtp' && s.kind === 'video') {
      bytesSent += s.bytesSent ?? 0;
      layers += 1;
    }
    if (s.type === 'candidate-pair' && s.nominated) available = Math.max(available, s.availableOutgoingBitrate ?? 0);
  }
  return { bytesSent, available, layers, at: performance.now() };
}

/**
 * @param {any} json  the /api/rooms body
 * @param {string} room
 * @returns {number | null} the room's participant count, null when the room is not listed
 */
function participantsInRoom(json, room) {
  let list = Array.isArray(json) ? json : (json?.rooms ?? []);
  if (!Array.isArray(list)) {
    list = Object.entries(list).map(([name, v]) => ({ name, ...(typeof v === 'object' ? v : {}) }));
  }
  const entry = list.find((r) =>
    [r?.name, r?.room, r?.id].some((v) => typeof v === 'string' && v.toLowerCase() === room),
  );
  if (!entry) return null;
  const p = entry.participants ?? entry.participantCount ?? entry.numParticipants;
  if (typeof p === 'number') return p;
  if (Array.isArray(p)) return p.length;
  return null;
}

/** @param {import('playwright-core').Page} page */
const remoteTileCount = (page) => page.locator('.tile.remote').count();

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts and answers /healthz', async () => {
    base = await startServer('server.log', ['--max-video-bitrate', `${MAX_VIDEO_BITRATE}`, '--mesh-max', '0']);
    check('server starts and answers /healthz', true, base);
  });
  if (!started) return;
  await launchBrowser();

  /** @param {string} name */
  const openPage = (name) =>
    openBrowserPage(name, base, `${base}/?room=${ROOM}&name=${encodeURIComponent(name)}&autojoin=1`, installStatsHelper);

  const names = Array.from({ length: PAGES }, (_, i) => `user${i + 1}`);
  // The first pages join together; the last joins a room where media already flows, which is
  // what a late joiner's time to first frame measures.
  const early = await Promise.all(names.slice(0, -1).map(openPage));
  const earlyFrames = early.map((page) =>
    page.evaluate(firstFrameTimes, { expected: PAGES - 2, timeoutMs: 45_000 }).catch(() => null),
  );
  await Promise.all(earlyFrames);
  const pages = [...early, await openPage(names[PAGES - 1])];
  const frameWatch = pages.map((page) =>
    page.evaluate(firstFrameTimes, { expected: PAGES - 1, timeoutMs: 45_000 }).catch(() => null),
  );

  await Promise.all(
    pages.map((page, i) =>
      step(`${names[i]} sees ${PAGES - 1} remote participants`, async () => {
        await page.waitForFunction(
          (n) =>
            // @ts-ignore
            window.__switchboard?.participants?.size === n &&
            document.querySelectorAll('.tile.remote').length === n,
          PAGES - 1,
          { timeout: 30_000 },
        );
        check(`${names[i]} sees ${PAGES - 1} remote participants`, true);
      }),
    ),
  );

  await step('GET /api/rooms lists the room with all participants', async () => {
    const res = await fetchRooms(base);
    const json = await res.json();
    const count = participantsInRoom(json, ROOM);
    check(
      `GET /api/rooms lists room ${ROOM} with ${PAGES} participants`,
      res.ok && count === PAGES,
      `status ${res.status}, participants ${count}, body ${JSON.stringify(json).slice(0, 200)}`,
    );
  });

  const frames = await Promise.all(frameWatch);
  const fmt = (/** @type {number | null | undefined} */ ms) =>
    ms == null ? 'never' : `${(ms / 1000).toFixed(2)} s`;
  frames.forEach((t, i) => {
    check(
      `${names[i]} decodes video from all ${PAGES - 1} remotes`,
      t?.all != null,
      `page load to first decoded frame ${fmt(t?.first)}, to all ${fmt(t?.all)}`,
    );
  });
  // The late joiner: each remote's video from the moment its subscription was announced to the
  // first decoded frame (negotiation, ICE, DTLS, and the keyframe the server asks for).
  const late = frames[PAGES - 1]?.subscribedToFrame ?? {};
  const lateTimes = Object.values(late);
  check(
    `late joiner ${names[PAGES - 1]} decodes every remote within 3 s of subscribing`,
    lateTimes.length === PAGES - 1 && lateTimes.every((ms) => ms < 3000),
    Object.entries(late)
      .map(([name, ms]) => `${name} ${fmt(ms)}`)
      .join(', '),
  );
  // Existing members get the newcomer's video: from its announcement to their first frame.
  const newcomer = frames
    .slice(0, -1)
    .map((t) => t?.subscribedToFrame?.[names[PAGES - 1]])
    .filter((ms) => ms != null);
  console.log(`      existing members: ${names[PAGES - 1]}'s video announced to first frame: ${newcomer.map(fmt).join(', ')}`);

  // Media must keep flowing: two samples ~2 s apart, per remote participant. Meanwhile the
  // server's CPU is measured, with four publishing pages and twelve forwarded streams each way.
  const cpuBefore = serverCpuSeconds();
  const cpuStart = performance.now();
  const samples = await Promise.all(
    pages.map(async (page) => {
      // @ts-ignore
      const before = await page.evaluate(() => window.__e2eRemoteStats());
      await sleep(2000);
      // @ts-ignore
      const after = await page.evaluate(() => window.__e2eRemoteStats());
      return { before, after };
    }),
  );
  const cpuShare = (serverCpuSeconds() - cpuBefore) / ((performance.now() - cpuStart) / 1000);
  console.log(`      server CPU with ${PAGES} publishing pages: ${(cpuShare * 100).toFixed(1)} % of one core`);
  samples.forEach(({ before, after }, i) => {
    for (const remote of names.filter((n) => n !== names[i])) {
      const v0 = before[remote]?.video;
      const v1 = after[remote]?.video;
      check(
        `${names[i]} receives ${remote}'s video`,
        !!v0 && !!v1 && v1.framesDecoded > v0.framesDecoded && v1.frameWidth > 0,
        v1 ? `framesDecoded ${v0?.framesDecoded} -> ${v1.framesDecoded}, ${v1.frameWidth}px wide` : 'no inbound-rtp',
      );
      const a0 = before[remote]?.audio;
      const a1 = after[remote]?.audio;
      check(
        `${names[i]} receives ${remote}'s audio`,
        !!a0 && !!a1 && a1.packetsReceived > a0.packetsReceived,
        a1 ? `packetsReceived ${a0?.packetsReceived} -> ${a1.packetsReceived}` : 'no inbound-rtp',
      );
      if (i === 0) {
        // Sender reports line each stream up with the server's wall clock (lip sync): each
        // must have arrived, counted what was sent, and carry a wall clock within 5 s of now.
        const reports = ['audio', 'video'].map((kind) => [kind, after[remote]?.[`${kind}Reports`]]);
        check(
          `${names[i]} gets sender reports for ${remote}'s audio and video`,
          reports.every(
            ([kind, r]) =>
              r &&
              r.reportsSent >= 1 &&
              r.packetsSent > 0 &&
              r.packetsSent <= after[remote]?.[kind]?.packetsReceived * 1.1 + 10 &&
              Math.abs(r.clockOffsetMs) < 5000,
          ),
          JSON.stringify(Object.fromEntries(reports)),
        );
      }
    }
  });

  await step('the first publisher ramps up to the configured maximum and stays under it', async () => {
    // The estimate starts at 300 kbit/s and climbs while feedback shows no congestion; give it
    // up to 20 s from here (a loaded 2-core machine can make it dip on the way).
    // A simulcast camera's section may carry half as much again, for its lower layers
    // (docs/protocol.md, Simulcast).
    // These pages' small cameras send about 250 kbit/s, less than the estimate allows: Chrome
    // then grows its estimate only to about twice what it sends unless its start-up probes
    // reach the cap (some runs they do, some not, with the old server and the new alike). So
    // the estimate must reach the cap or stay well clear of what the video sends, which shows
    // the server's feedback is not what holds the video back; and it never passes the cap.
    const first = await pages[0].evaluate(publishedVideo);
    const cap = (first?.layers ?? 0) > 1 ? 1.5 * MAX_VIDEO_BITRATE : MAX_VIDEO_BITRATE;
    const deadline = Date.now() + 20_000;
    let a = first;
    while (a && a.available < 0.8 * cap && Date.now() < deadline) {
      await sleep(1000);
      a = await pages[0].evaluate(publishedVideo);
    }
    await sleep(3000);
    const b = await pages[0].evaluate(publishedVideo);
    if (!a || !b) throw new Error('no publish connection');
    const rate = ((b.bytesSent - a.bytesSent) * 8) / ((b.at - a.at) / 1000);
    const reached = a.available >= 0.8 * cap || (a.available >= 450_000 && a.available >= 1.5 * rate);
    check(
      `${names[0]}'s send estimate ramps up to the ${cap / 1000} kbit/s maximum, or well past what its video sends (${b.layers} layers), and video stays under it`,
      // Reached within 20 s (a loaded machine may dip it again right after), and never above.
      reached &&
        Math.max(a.available, b.available) <= 1.05 * cap &&
        rate > 0 &&
        rate < 1.15 * cap,
      `estimate ${(a.available / 1000).toFixed(0)} then ${(b.available / 1000).toFixed(0)} kbit/s, ${(rate / 1000).toFixed(0)} kbit/s sent`,
    );
  });

  await Promise.all(
    pages.map((page, i) =>
      page.screenshot({ path: path.join(outDir, `${names[i]}.png`) }).catch(() => {}),
    ),
  );

  // The server hears who speaks (the audio-level header extension of every microphone): every
  // fake microphone beeps now and then, so over a few seconds each page hears each of the other
  // three; one that mutes is heard no more.
  await step('the server names who speaks', async () => {
    const listen = () =>
      Promise.all(
        pages.map((p) =>
          p.evaluate(() => {
            const w = /** @type {any} */ (window);
            w.__heard = new Set();
            w.__unlisten?.();
            w.__unlisten = w.__switchboard.on('speakers', (/** @type {{peerId: string}[]} */ list) => {
              for (const s of list) w.__heard.add(s.peerId);
            });
          }),
        ),
      );
    const heard = () => Promise.all(pages.map((p) => p.evaluate(() => [.../** @type {any} */ (window).__heard])));
    await listen();
    const deadline = Date.now() + 10_000;
    let lists = await heard();
    while (!lists.every((l) => l.length === PAGES - 1) && Date.now() < deadline) {
      await sleep(250);
      lists = await heard();
    }
    check(`every page is told each of its ${PAGES - 1} beeping peers speaks`, lists.every((l) => l.length === PAGES - 1), `heard: ${lists.map((l) => l.length).join(', ')}`);
    await pages[0].click('#mic');
    const muted = await pages[0].evaluate(() => /** @type {any} */ (window).__switchboard.participantId);
    await sleep(1000);
    await listen();
    await sleep(4000);
    lists = await heard();
    const others = lists.slice(1);
    check(
      `${names[0]} mutes and is heard no more, while the others still are`,
      others.every((l) => !l.includes(muted) && l.length === PAGES - 2),
      `heard after the mute: ${others.map((l) => l.length).join(', ')}`,
    );
    await pages[0].click('#mic');
  });

  // Large rooms: a tile scrolled out of view stops receiving video, and resumes when seen.
  await step('off-screen tiles pause their video', async () => {
    const page = pages[0];
    await page.setViewportSize({ width: 1000, height: 300 });
    const offscreenNames = () =>
      page.evaluate(() =>
        [...document.querySelectorAll('.tile.remote')]
          .filter((t) => t.getBoundingClientRect().top >= window.innerHeight)
          .map((t) => t.querySelector('.label')?.textContent ?? ''),
      );
    const hidden = await offscreenNames();
    if (hidden.length === 0 || hidden.length === PAGES - 1) throw new Error(`layout: ${hidden.length} tiles off screen`);
    await sleep(1000);
    // @ts-ignore
    const before = await page.evaluate(() => window.__e2eRemoteStats());
    await sleep(1500);
    // @ts-ignore
    const after = await page.evaluate(() => window.__e2eRemoteStats());
    const frames = (/** @type {any} */ s, /** @type {string} */ n) => s[n]?.video?.framesDecoded ?? 0;
    const others = names.filter((n) => n !== names[0]);
    const detail = others.map((n) => `${n}${hidden.includes(n) ? ' (off screen)' : ''} ${frames(before, n)} -> ${frames(after, n)}`).join(', ');
    check(
      `${names[0]} receives no video for tiles off screen, and keeps receiving the others`,
      others.every((n) => (hidden.includes(n) ? frames(after, n) === frames(before, n) : frames(after, n) > frames(before, n))),
      detail,
    );
    await page.evaluate((n) => {
      const tile = [...document.querySelectorAll('.tile.remote')].find((t) => t.querySelector('.label')?.textContent === n);
      tile?.scrollIntoView();
    }, hidden[0]);
    const t0 = performance.now();
    let resumed = false;
    while (!resumed && performance.now() - t0 < 5000) {
      await sleep(100);
      // @ts-ignore
      resumed = frames(await page.evaluate(() => window.__e2eRemoteStats()), hidden[0]) > frames(after, hidden[0]);
    }
    check(`${hidden[0]}'s video resumes when its tile is scrolled into view`, resumed, `after ${Math.round(performance.now() - t0)} ms`);
    await page.setViewportSize({ width: 1000, height: 760 });
  });

  // A participant leaves: the others must drop its tile within 10 s.
  const leaver = names[PAGES - 1];
  await pages[PAGES - 1].context().close();
  const stayers = pages.slice(0, -1);
  await Promise.all(
    stayers.map((page, i) =>
      step(`${names[i]} drops ${leaver}'s tile`, async () => {
        await page.waitForFunction(
          (n) => document.querySelectorAll('.tile.remote').length === n,
          PAGES - 2,
          { timeout: 10_000 },
        );
        const labels = await page.locator('.tile.remote .label').allTextContents();
        check(
          `${names[i]} drops ${leaver}'s tile within 10 s`,
          !labels.includes(leaver),
          `remaining: ${labels.join(', ')}`,
        );
        await page.screenshot({ path: path.join(outDir, `${names[i]}-after-leave.png`) });
      }),
    ),
  );

  // A second "user1" in another case is refused, and the page says so.
  await step('a taken name is refused with name_taken', async () => {
    const dup = await openPage(names[0].toUpperCase());
    await dup.waitForFunction(
      () => {
        const box = document.getElementById('error');
        return !!box && !box.hidden && /name_taken/.test(box.textContent ?? '');
      },
      null,
      { timeout: 15_000 },
    );
    const text = await dup.locator('#error').textContent();
    await dup.screenshot({ path: path.join(outDir, 'name-taken.png') });
    check('a taken name (other case) is refused with name_taken', true, text ?? '');
    const tiles = await remoteTileCount(stayers[0]);
    check(`the refused join does not appear as a participant`, tiles === PAGES - 2, `${tiles} remote tiles`);
    await dup.context().close();
  });
}

await run(main, TOTAL_TIMEOUT_MS);

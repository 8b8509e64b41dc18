// End-to-end test of mesh rooms and the switch to the SFU and back, with real Chromium pages
// running the demo app against the real server binary.
// Run inside the loopback-only namespace:  ../shared/bin/netns node web-client/tests/mesh.mjs
// Environment: see harness.mjs.
import path from 'node:path';
import { check, fetchRooms, launchBrowser, openPage, outDir, run, sleep, startServer, step } from './harness.mjs';

const ROOM = 'mesh';
const HOLD_SECS = 3;
// The longest a remote camera may stop producing new frames on screen during a switch.
const MAX_GAP_MS = 1500;
// Handed to clients for every connection, mesh ones included. Nothing listens there in the
// namespace: the browser's STUN requests just go unanswered.
const ICE_SERVER = 'stun:127.0.0.1:3478';
const TOTAL_TIMEOUT_MS = 260_000;

/** Installed into every page: what the app shows of each remote participant, and a gap meter. */
function installMeshHelper() {
  /**
   * @param {any} t  a RemoteTrack
   * @returns {Promise<{path: string, trackId: string, framesDecoded: number, packetsReceived: number, at: number, squaredDelays: number, freezes: number, freezeMs: number}>}
   */
  const statsOf = async (t) => {
    /** @type {any} */
    let inbound = {};
    try {
      for (const s of (await t.receiver.getStats()).values()) if (s.type === 'inbound-rtp') inbound = s;
    } catch {
      // closed
    }
    return {
      path: t.path,
      trackId: t.track.id,
      framesDecoded: inbound.framesDecoded ?? 0,
      packetsReceived: inbound.packetsReceived ?? 0,
      at: inbound.timestamp ?? 0,
      squaredDelays: inbound.totalSquaredInterFrameDelay ?? 0,
      freezes: inbound.freezeCount ?? 0,
      freezeMs: (inbound.totalFreezesDuration ?? 0) * 1000,
    };
  };
  // @ts-ignore
  window.__view = async () => {
    // @ts-ignore
    const room = window.__switchboard;
    /** @type {Record<string, any>} */
    const participants = {};
    for (const p of room?.participants?.values() ?? []) {
      /** @type {Record<string, any>} */
      const entry = {};
      for (const t of p.tracks.values()) {
        const role = t.kind === 'audio' ? 'audio' : t.source === 'screen' ? 'screen' : 'video';
        entry[role] = await statsOf(t);
      }
      participants[p.name] = entry;
    }
    return {
      state: room?.state,
      mode: room?.mode,
      switching: room?.switching,
      meshLinks: room?.mesh?.size ?? 0,
      sfuConnections: [room?.publishPc, room?.subscribePc].filter(Boolean).length,
      participants,
    };
  };
  // The gap meter samples, every 100 ms, the camera track each tile shows, all participants'
  // at once, and keeps each remote's longest stretch without a new decoded frame, counted from
  // its first decoded frame (waiting for a newcomer's first frame is not a stall):
  // - Between two samples of the same track that decoded frames, the longest stretch ending
  //   there is the largest inter-frame delay of those frames, and no one of them exceeds the
  //   square root of the growth of totalSquaredInterFrameDelay. That bound does not depend on
  //   how promptly the busy page got to sample.
  // - Across a swap to another track that is already decoding, and from the last new frame to
  //   the end, only the samples' own timestamps (when the browser took the snapshot) tell; the
  //   longest time between two samples is reported with them.
  // The browser's own freeze counters (freezeCount, totalFreezesDuration) are reported too.
  /**
   * @typedef {{trackId: string, frames: number, at: number, squaredDelays: number}} Sample
   * @typedef {{running: boolean, gaps: Record<string, number>, where: Record<string, string>,
   *   lastProgress: Record<string, number>, prev: Record<string, Sample>, lastAt: number,
   *   longestInterval: number, freezes: Map<string, {name: string, first: {count: number, ms: number}, last: {count: number, ms: number}}>}} Meter
   */
  /** @returns {Meter} */
  const freshMeter = () => ({
    running: false,
    gaps: {},
    where: {},
    lastProgress: {},
    prev: {},
    lastAt: 0,
    longestInterval: 0,
    freezes: new Map(),
  });
  const meter = freshMeter();
  // @ts-ignore
  window.__startGapMeter = () => {
    Object.assign(meter, freshMeter(), { running: true });
    let firstRound = true;
    (async () => {
      while (meter.running) {
        // @ts-ignore
        const room = window.__switchboard;
        const shown = [...(room?.participants?.values() ?? [])].flatMap((p) => {
          const camera = [...p.tracks.values()].find((t) => t.kind === 'video' && t.source === 'camera');
          return camera ? [{ name: p.name, camera }] : [];
        });
        const samples = await Promise.all(shown.map(({ camera }) => statsOf(camera)));
        for (const [i, { name }] of shown.entries()) {
          const s = samples[i];
          if (!s.at) continue;
          const prev = meter.prev[name];
          const sameTrack = prev?.trackId === s.trackId;
          const progress = sameTrack ? s.framesDecoded > prev.frames : s.framesDecoded > 0;
          if (progress) {
            const started = meter.lastProgress[name] !== undefined;
            const stretch = !started
              ? 0
              : sameTrack
                ? Math.sqrt(Math.max(0, s.squaredDelays - prev.squaredDelays)) * 1000
                : s.at - meter.lastProgress[name];
            if (!started || stretch > meter.gaps[name]) {
              meter.gaps[name] = stretch;
              meter.where[name] = sameTrack || !started ? s.path : `swap to ${s.path}`;
            }
            meter.lastProgress[name] = s.at;
          }
          if (prev) meter.longestInterval = Math.max(meter.longestInterval, s.at - prev.at);
          meter.prev[name] = { trackId: s.trackId, frames: s.framesDecoded, at: s.at, squaredDelays: s.squaredDelays };
          meter.lastAt = Math.max(meter.lastAt, s.at);
          // A track first seen after the start is new: all its freezes happened meanwhile.
          const counted = { count: s.freezes, ms: s.freezeMs };
          const entry = meter.freezes.get(s.trackId);
          if (entry) entry.last = counted;
          else meter.freezes.set(s.trackId, { name, first: firstRound ? counted : { count: 0, ms: 0 }, last: counted });
        }
        firstRound = false;
        await new Promise((r) => setTimeout(r, 100));
      }
    })();
  };
  // @ts-ignore
  window.__stopGapMeter = () => {
    meter.running = false;
    for (const [name, last] of Object.entries(meter.lastProgress)) {
      if (meter.lastAt - last > (meter.gaps[name] ?? 0)) {
        meter.gaps[name] = meter.lastAt - last;
        meter.where[name] = 'at the end';
      }
    }
    /** @type {Record<string, {ms: number, where: string, freezes: number, freezeMs: number}>} */
    const remotes = {};
    for (const [name, ms] of Object.entries(meter.gaps)) {
      remotes[name] = { ms, where: meter.where[name], freezes: 0, freezeMs: 0 };
    }
    for (const { name, first, last } of meter.freezes.values()) {
      if (!remotes[name]) continue;
      remotes[name].freezes += last.count - first.count;
      remotes[name].freezeMs += last.ms - first.ms;
    }
    return { remotes, longestInterval: meter.longestInterval };
  };
  /** @type {{mode: string, phase: string, at: number}[]} */
  const modeEvents = [];
  // @ts-ignore
  window.__modeEvents = modeEvents;
  const hook = () => {
    // @ts-ignore
    const room = window.__switchboard;
    if (!room) return setTimeout(hook, 20);
    room.on('modeChanged', (/** @type {any} */ e) => {
      modeEvents.push({ ...e, at: performance.now() });
      if (e.phase === 'switching') watchOldPath(room, e.mode);
    });
  };
  hook();
  /**
   * What the camera is sent at on the old path while a switch to `mode` is under way: the
   * narrowest frame the old connections' camera encodings report, against the camera's own width.
   * @type {{mode: string, trackWidth: number, narrowest: number}[]}
   */
  const oldPathCamera = [];
  // @ts-ignore
  window.__oldPathCamera = oldPathCamera;
  /**
   * @param {any} room
   * @param {string} mode
   */
  const watchOldPath = async (room, mode) => {
    const pcs = mode === 'sfu' ? [...room.mesh.values()].map((/** @type {any} */ l) => l.pc) : [room.publishPc];
    const camera = room.localStream?.getVideoTracks()[0];
    const record = { mode, trackWidth: camera?.getSettings().width ?? 0, narrowest: Infinity };
    oldPathCamera.push(record);
    const deadline = performance.now() + 3000;
    while (room.switching && room.mode === mode && performance.now() < deadline) {
      for (const pc of pcs) {
        if (!pc || pc.connectionState === 'closed') continue;
        const sender = pc.getSenders().find((/** @type {RTCRtpSender} */ s) => s.track === camera);
        if (!sender) continue;
        try {
          for (const s of (await sender.getStats()).values()) {
            if (s.type === 'outbound-rtp' && s.frameWidth) record.narrowest = Math.min(record.narrowest, s.frameWidth);
          }
        } catch {
          // closed meanwhile
        }
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  };
}

/**
 * In the page: resolves when the page shows `others` remote participants, each with camera and
 * microphone arriving through `path` connections and decoding, and the room settled in `mode`.
 * @param {{others: number, path: string, mode: string, timeoutMs: number}} arg
 */
async function settledView({ others, path, mode, timeoutMs }) {
  const deadline = performance.now() + timeoutMs;
  /** @type {any} */
  let view = null;
  while (performance.now() < deadline) {
    // @ts-ignore
    view = await window.__view();
    const entries = Object.values(view.participants);
    const ok =
      view.mode === mode &&
      !view.switching &&
      entries.length === others &&
      entries.every(
        (/** @type {any} */ e) =>
          e.video?.path === path && e.video.framesDecoded > 0 && e.audio?.path === path && e.audio.packetsReceived > 0,
      );
    if (ok) return { ok: true, view };
    await new Promise((r) => setTimeout(r, 100));
  }
  return { ok: false, view };
}

/**
 * @param {string} base
 * @returns {Promise<Record<string, number>>} the server's metrics, by name with labels
 */
async function metrics(base) {
  const text = await (await fetch(`${base}/metrics`)).text();
  /** @type {Record<string, number>} */
  const out = {};
  for (const line of text.split('\n')) {
    const m = /^(\S+) (\S+)$/.exec(line);
    if (m && !line.startsWith('#')) out[m[1]] = Number(m[2]);
  }
  return out;
}

/**
 * @param {string} base
 * @returns {Promise<any>} the test room in /api/rooms
 */
async function roomInfo(base) {
  const json = await (await fetchRooms(base)).json();
  return json.rooms.find((/** @type {any} */ r) => r.name === ROOM) ?? null;
}

/** @typedef {{ms: number, where: string, freezes: number, freezeMs: number}} GapReport */

/**
 * @param {[string, GapReport][]} remotes
 * @param {number} longestInterval  the longest time between two samples of one remote
 */
function describeGaps(remotes, longestInterval) {
  const each = remotes.map(
    ([n, e]) =>
      `${n} ${Math.round(e.ms)} ms (${e.where}; browser counted ${e.freezes} freezes, ${Math.round(e.freezeMs)} ms)`,
  );
  return `longest stall per remote: ${each.join(', ')}; samples at most ${Math.round(longestInterval)} ms apart`;
}

/**
 * Checks that while the latest switch to `mode` was under way each page sent its camera on the
 * old path at no more than half its width.
 * @param {import('playwright-core').Page[]} group
 * @param {string} mode
 * @param {string} oldPath  for the message
 */
async function checkOldPathLightened(group, mode, oldPath) {
  const seen = await Promise.all(
    group.map((p) =>
      p.evaluate((m) => /** @type {any} */ (window).__oldPathCamera.filter((/** @type {any} */ r) => r.mode === m).at(-1), mode),
    ),
  );
  check(
    `while switching to ${mode}, ${oldPath} carried the camera at half size or less`,
    seen.every((r) => r && r.trackWidth > 0 && r.narrowest <= r.trackWidth / 2),
    seen.map((r) => (r ? `${Number.isFinite(r.narrowest) ? r.narrowest : 'no frame'} of ${r.trackWidth} px` : 'no switch seen')).join(', '),
  );
}

/** @param {any} view */
function describe(view) {
  if (!view) return 'no view';
  const parts = Object.entries(view.participants).map(
    ([name, e]) =>
      `${name}: video ${e.video?.path ?? '-'}/${e.video?.framesDecoded ?? 0}, audio ${e.audio?.path ?? '-'}/${e.audio?.packetsReceived ?? 0}`,
  );
  return `mode ${view.mode}${view.switching ? ' (switching)' : ''}, ${view.meshLinks} mesh links, ${view.sfuConnections} sfu connections; ${parts.join('; ')}`;
}

async function main() {
  /** @type {string} */
  let base = '';
  const started = await step('server starts', async () => {
    base = await startServer('server-mesh.log', ['--mesh-hold-secs', `${HOLD_SECS}`, '--ice-server', ICE_SERVER]);
    check('server starts with mesh rooms of up to 3 (the default)', true, base);
  });
  if (!started) return;
  await launchBrowser();
  /** @param {string} name */
  const open = (name) =>
    openPage(name, base, `${base}/?room=${ROOM}&name=${encodeURIComponent(name)}&autojoin=1`, installMeshHelper);
  const names = ['user1', 'user2', 'user3', 'user4'];
  /** @type {import('playwright-core').Page[]} */
  const pages = [];

  /**
   * @param {import('playwright-core').Page[]} group
   * @param {{others: number, path: string, mode: string, timeoutMs?: number}} want
   * @param {string} what
   */
  const expectAll = (group, want, what) =>
    Promise.all(
      group.map(async (page, i) => {
        const result = await page.evaluate(settledView, { timeoutMs: 30_000, ...want }).catch((err) => ({
          ok: false,
          view: String(err),
        }));
        check(`${names[i]}: ${what}`, result.ok, describe(result.view));
        return result.view;
      }),
    );

  // Two pages: a mesh, no media through the server.
  pages.push(await open(names[0]), await open(names[1]));
  await expectAll(pages, { others: 1, path: 'mesh', mode: 'mesh' }, 'mesh of two, the other decoding over the mesh');
  const iceServers = await pages[0].evaluate(() =>
    [.../** @type {any} */ (window).__switchboard.mesh.values()].map((l) => l.pc.getConfiguration().iceServers),
  );
  check(
    'mesh connections use the configured ICE servers',
    iceServers.length === 1 && JSON.stringify(iceServers[0]).includes(ICE_SERVER),
    JSON.stringify(iceServers),
  );
  let counters = await metrics(base);
  let room = await roomInfo(base);
  check(
    'a mesh of two forwards nothing through the server',
    room?.mode === 'mesh' && room?.forwardedPackets === 0 && counters.switchboard_forwarded_packets_total === 0,
    `room mode ${room?.mode}, forwarded ${counters.switchboard_forwarded_packets_total}, negotiators ${counters.switchboard_negotiators}`,
  );

  // A third page: still a mesh, everyone decodes both others.
  pages.push(await open(names[2]));
  await expectAll(pages, { others: 2, path: 'mesh', mode: 'mesh' }, 'mesh of three, both others decoding over the mesh');
  counters = await metrics(base);
  check(
    'a mesh of three forwards nothing through the server',
    counters.switchboard_forwarded_packets_total === 0 && counters.switchboard_negotiators === 0,
    `forwarded ${counters.switchboard_forwarded_packets_total}, negotiators ${counters.switchboard_negotiators}`,
  );
  await Promise.all(pages.map((p, i) => p.screenshot({ path: path.join(outDir, `mesh-${names[i]}.png`) })));

  // Renegotiation in the mesh: two pages start a screen share at the same moment (both offer at
  // once), later stop it at the same moment. Perfect negotiation must sort out both collisions.
  await step('simultaneous screen shares in the mesh', async () => {
    const share = () => {
      const canvas = document.createElement('canvas');
      canvas.width = 320;
      canvas.height = 180;
      const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext('2d'));
      let n = 0;
      setInterval(() => {
        ctx.fillStyle = `hsl(${(n += 7) % 360}, 80%, 50%)`;
        ctx.fillRect(0, 0, 320, 180);
      }, 40);
      // @ts-ignore
      return window.__switchboard.startScreenShare(canvas.captureStream(15).getVideoTracks()[0]);
    };
    await Promise.all([pages[0].evaluate(share), pages[1].evaluate(share)]);
    const seesScreens = async (/** @type {number} */ i, /** @type {string[]} */ sharers, /** @type {boolean} */ want) => {
      const deadline = Date.now() + 15_000;
      /** @type {any} */
      let view = null;
      while (Date.now() < deadline) {
        view = await pages[i].evaluate(() => /** @type {any} */ (window).__view());
        const ok = sharers.every((s) =>
          want ? view.participants[s]?.screen?.framesDecoded > 0 : !view.participants[s]?.screen,
        );
        if (ok) return { ok, view };
        await sleep(200);
      }
      return { ok: false, view };
    };
    for (const [i, sharers] of /** @type {[number, string[]][]} */ ([[0, ['user2']], [1, ['user1']], [2, ['user1', 'user2']]])) {
      const r = await seesScreens(i, sharers, true);
      check(`${names[i]} decodes the screen shares of ${sharers.join(' and ')} started at the same moment`, r.ok,
        Object.entries(r.view?.participants ?? {}).map(([n, e]) => `${n} screen ${e.screen?.framesDecoded ?? '-'}`).join(', '));
    }
    await Promise.all([0, 1].map((i) => pages[i].evaluate(() => /** @type {any} */ (window).__switchboard.stopScreenShare())));
    for (const [i, sharers] of /** @type {[number, string[]][]} */ ([[0, ['user2']], [1, ['user1']], [2, ['user1', 'user2']]])) {
      const r = await seesScreens(i, sharers, false);
      check(`${names[i]} sees the screen shares of ${sharers.join(' and ')} end`, r.ok, '');
    }
  });
  await expectAll(pages, { others: 2, path: 'mesh', mode: 'mesh' }, 'cameras still decoding over the mesh after the screen shares');

  // A fourth page: the room switches to SFU; nobody's video may stall for long.
  await Promise.all(pages.map((p) => p.evaluate(() => /** @type {any} */ (window).__startGapMeter())));
  const upAt = Date.now();
  pages.push(await open(names[3]));
  await expectAll(pages, { others: 3, path: 'sfu', mode: 'sfu', timeoutMs: 40_000 }, 'switched to SFU, three remotes decoding through the server');
  const upSettled = Date.now() - upAt;
  let gaps = await Promise.all(pages.slice(0, 3).map((p) => p.evaluate(() => /** @type {any} */ (window).__stopGapMeter())));
  gaps.forEach((g, i) => {
    const entries = Object.entries(/** @type {Record<string, GapReport>} */ (g.remotes));
    const worst = Math.max(0, ...entries.map(([, e]) => e.ms));
    check(
      `${names[i]}: no remote video stalls over ${MAX_GAP_MS} ms while switching up`,
      entries.length === 3 && worst < MAX_GAP_MS,
      describeGaps(entries, g.longestInterval),
    );
  });
  console.log(`      switch up: fourth page opened to every page settled in SFU: ${(upSettled / 1000).toFixed(1)} s`);
  await checkOldPathLightened(pages.slice(0, 3), 'sfu', 'the mesh connections');
  const upViews = await Promise.all(pages.map((p) => p.evaluate(() => /** @type {any} */ (window).__view())));
  check('the mesh connections are closed once the room settled in SFU', upViews.every((v) => v.meshLinks === 0),
    upViews.map((v) => v.meshLinks).join(', '));
  room = await roomInfo(base);
  check('/api/rooms shows the room in SFU mode after one switch', room?.mode === 'sfu' && room?.switchesToSfu === 1,
    JSON.stringify({ mode: room?.mode, switchesToSfu: room?.switchesToSfu }));
  await Promise.all(pages.map((p, i) => p.screenshot({ path: path.join(outDir, `sfu-${names[i]}.png`) })));

  // The fourth leaves: after the hold time the room returns to mesh, again without a stall.
  await Promise.all(pages.slice(0, 3).map((p) => p.evaluate(() => /** @type {any} */ (window).__startGapMeter())));
  const downAt = Date.now();
  await pages[3].context().close();
  pages.pop();
  await expectAll(pages, { others: 2, path: 'mesh', mode: 'mesh', timeoutMs: 40_000 }, 'back to mesh after the hold, both others decoding over the mesh');
  const downSettled = Date.now() - downAt;
  gaps = await Promise.all(pages.map((p) => p.evaluate(() => /** @type {any} */ (window).__stopGapMeter())));
  gaps.forEach((g, i) => {
    const stayers = Object.entries(/** @type {Record<string, GapReport>} */ (g.remotes)).filter(([n]) => n !== 'user4');
    const worst = Math.max(0, ...stayers.map(([, e]) => e.ms));
    check(
      `${names[i]}: no remote video stalls over ${MAX_GAP_MS} ms while switching down`,
      stayers.length === 2 && worst < MAX_GAP_MS,
      describeGaps(stayers, g.longestInterval),
    );
  });
  console.log(`      switch down: fourth page closed to every page settled in mesh: ${(downSettled / 1000).toFixed(1)} s (hold ${HOLD_SECS} s)`);
  await checkOldPathLightened(pages, 'mesh', 'the publish connection');
  check(`the room stayed in SFU for the hold time (${HOLD_SECS} s)`, downSettled >= HOLD_SECS * 1000, `${downSettled} ms`);
  const before = await metrics(base);
  await sleep(2000);
  const after = await metrics(base);
  check(
    'back in mesh, the server forwards nothing more and holds no media tasks',
    after.switchboard_forwarded_packets_total === before.switchboard_forwarded_packets_total &&
      after.switchboard_negotiators === 0 &&
      after.switchboard_fanout_tasks === 0,
    `forwarded ${before.switchboard_forwarded_packets_total} -> ${after.switchboard_forwarded_packets_total}, negotiators ${after.switchboard_negotiators}, fanouts ${after.switchboard_fanout_tasks}`,
  );
  const downViews = await Promise.all(pages.map((p) => p.evaluate(() => /** @type {any} */ (window).__view())));
  check('the SFU connections are closed once the room settled in mesh', downViews.every((v) => v.sfuConnections === 0),
    downViews.map((v) => v.sfuConnections).join(', '));

  // Leave and rejoin five times quickly (user3, with the app's Leave button and join form).
  await step('leave and rejoin five times', async () => {
    const page = pages[2];
    for (let round = 0; round < 5; round++) {
      await page.click('#leave');
      await page.waitForFunction(() => !(/** @type {HTMLElement} */ (document.getElementById('join-form')).hidden), null, { timeout: 10_000 });
      await page.evaluate(() => /** @type {HTMLFormElement} */ (document.getElementById('join-form')).requestSubmit());
      await page.waitForFunction(() => /** @type {any} */ (window).__switchboard?.state === 'joined', null, { timeout: 10_000 });
    }
    check('user3 left and rejoined five times', true);
  });
  await expectAll(pages, { others: 2, path: 'mesh', mode: 'mesh' }, 'after five rejoins, both others decoding over the mesh');
  const errors = await Promise.all(
    pages.map(async (p) => ((await p.locator('#error').isVisible()) ? await p.locator('#error').textContent() : null)),
  );
  check('no page shows an error', errors.every((e) => !e), errors.map((e, i) => `${names[i]}: ${e ?? 'none'}`).join('; '));
  const finalCounters = await metrics(base);
  room = await roomInfo(base);
  check(
    'the server holds exactly three participants and sessions, and no media tasks',
    room?.participants?.length === 3 &&
      finalCounters.switchboard_sessions === 3 &&
      finalCounters.switchboard_negotiators === 0 &&
      finalCounters.switchboard_fanout_tasks === 0 &&
      finalCounters.switchboard_media_connections === 0,
    `participants ${room?.participants?.length}, sessions ${finalCounters.switchboard_sessions}, negotiators ${finalCounters.switchboard_negotiators}, fanouts ${finalCounters.switchboard_fanout_tasks}, media connections ${finalCounters.switchboard_media_connections}`,
  );
  check('no switch was caused by leaving and rejoining', room?.switchesToSfu === 1 && room?.switchesToMesh === 1,
    `switchesToSfu ${room?.switchesToSfu}, switchesToMesh ${room?.switchesToMesh}`);
  await Promise.all(pages.map((p, i) => p.screenshot({ path: path.join(outDir, `mesh-again-${names[i]}.png`) })));

  // A switch back to mesh that never completes (user1 never reports its mesh media) returns the
  // room to SFU for good after 10 s, and the cameras lightened for the switch go back to full size.
  await step('a switch to mesh that fails returns to SFU at full size', async () => {
    await pages[0].evaluate(() => {
      const send = WebSocket.prototype.send;
      WebSocket.prototype.send = function (data) {
        if (typeof data === 'string' && data.includes('"type":"ready"') && data.includes('"mode":"mesh"')) return;
        return send.call(this, data);
      };
    });
    pages.push(await open(names[3]));
    await expectAll(pages, { others: 3, path: 'sfu', mode: 'sfu', timeoutMs: 40_000 }, 'switched to SFU again');
    const seenBefore = await pages[1].evaluate(() => /** @type {any} */ (window).__modeEvents.length);
    await pages[3].context().close();
    pages.pop();
    await pages[1].waitForFunction(
      (n) => /** @type {any} */ (window).__modeEvents.slice(n).some((/** @type {any} */ e) => e.mode === 'mesh' && e.phase === 'switching'),
      seenBefore,
      { timeout: 20_000 },
    );
    await expectAll(pages, { others: 2, path: 'sfu', mode: 'sfu', timeoutMs: 40_000 }, 'back in SFU after the switch to mesh timed out');
    room = await roomInfo(base);
    check(
      'the room stays in SFU after a switch to mesh nobody completed',
      room?.mode === 'sfu' && room?.meshBlocked === true && room?.switchesToMesh === 2,
      JSON.stringify({ mode: room?.mode, meshBlocked: room?.meshBlocked, switchesToMesh: room?.switchesToMesh }),
    );
    await checkOldPathLightened(pages, 'mesh', 'the publish connection');
    // Full size again: the top simulcast layer carries no scaling or frame rate cap, and the
    // largest layer some subscriber watches (dynacast turns off the others) goes out at its
    // size unless the browser itself holds the resolution down (its CPU or bandwidth
    // adaptation, as on a loaded machine).
    const restored = await Promise.all(
      pages.map((p) =>
        p.evaluate(async () => {
          // @ts-ignore
          const room = window.__switchboard;
          const camera = room.localStream?.getVideoTracks()[0];
          const sender = room.publishPc?.getSenders().find((/** @type {RTCRtpSender} */ s) => s.track === camera);
          const width = camera?.getSettings().width ?? 0;
          const encodings = sender.getParameters().encodings;
          const top = encodings.reduce((/** @type {any} */ a, /** @type {any} */ b) =>
            (b.scaleResolutionDownBy ?? 1) < (a.scaleResolutionDownBy ?? 1) ? b : a,
          );
          const active = encodings.filter((/** @type {any} */ e) => e.active !== false);
          const expected = Math.max(...active.map((/** @type {any} */ e) => Math.floor(width / (e.scaleResolutionDownBy ?? 1))));
          let sent = 0;
          let limitation = '';
          for (let i = 0; i < 50 && sent < expected; i++) {
            await new Promise((r) => setTimeout(r, 100));
            sent = 0;
            for (const s of (await sender.getStats()).values()) {
              if (s.type !== 'outbound-rtp') continue;
              sent = Math.max(sent, s.frameWidth ?? 0);
              limitation ||= s.qualityLimitationReason === 'none' ? '' : s.qualityLimitationReason ?? '';
            }
          }
          const maxFps = encodings.map((/** @type {any} */ e) => e.maxFramerate).filter((/** @type {any} */ f) => f !== undefined);
          return { width, expected, sent, limitation, scale: top.scaleResolutionDownBy ?? 1, fps: maxFps.length ? maxFps : null };
        }),
      ),
    );
    check(
      'every camera is sent through the server at full size again',
      restored.every((r) => r.scale === 1 && r.fps === null && (r.sent >= r.expected || ['cpu', 'bandwidth'].includes(r.limitation))),
      restored
        .map((r) => `${r.sent} of ${r.expected} px (camera ${r.width}) sent (limited by: ${r.limitation || 'none'}), top scale ${r.scale}, max fps ${r.fps ?? 'none'}`)
        .join('; '),
    );
  });
}

await run(main, TOTAL_TIMEOUT_MS);

// The app's "Meet someone new": Find, Next and Stop over the server's waiting queue, a pulsing
// indicator while it waits, and each match joined as a room of two.
import { linkToken } from './calls.js';
import { Matchmaker } from './client.js';

/**
 * @typedef {object} MeetHooks  What meeting strangers needs of the app.
 * @property {(room: string, name: string, token: string, label: string) => void} join  join a match's room
 * @property {() => void} leaveRoom  leave the match's room, if in one
 * @property {(err: {code?: string, message?: string} | null) => void} showError
 */

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const panel = $('meet');
const statusText = $('meet-status');
const findButton = /** @type {HTMLButtonElement} */ ($('meet-find'));
const nextButton = /** @type {HTMLButtonElement} */ ($('meet-next'));
const stopButton = /** @type {HTMLButtonElement} */ ($('meet-stop'));

/** @type {Matchmaker | null} */
let finder = null;
/** @type {MeetHooks} */
let hooks;
/** The name to look with. */
let myName = '';
/** What the status says when the queue has nothing new to say. */
let said = '';
/** The partner's name, remembered past the match for "… left". */
let lastPartner = '';

/** @param {MeetHooks} given */
export function initMeet(given) {
  hooks = given;
  findButton.addEventListener('click', () => meet(myName));
  nextButton.addEventListener('click', () => {
    hooks.leaveRoom();
    finder?.next();
    render();
  });
  stopButton.addEventListener('click', () => {
    hooks.leaveRoom();
    finder?.stop();
    said = 'Stopped. Press Find to meet someone.';
    render();
  });
}

/**
 * Looks for someone to talk to as `name`.
 * @param {string} name
 */
export async function meet(name) {
  if (!name) return;
  myName = name;
  hooks.showError(null);
  panel.hidden = false;
  if (!finder || finder.state === 'closed') {
    const current = new Matchmaker();
    finder = current;
    // For end-to-end tests and the console.
    Object.assign(window, { __switchboardMeet: current });
    current.on('waiting', () => render());
    current.on('matched', ({ name: other, room, token }) => {
      said = '';
      render();
      hooks.join(room, myName, token, `Talking with ${other}`);
    });
    current.on('partnerLeft', () => {
      const other = lastPartner;
      hooks.leaveRoom();
      said = `${other || 'Your partner'} left. Press Find to meet someone else.`;
      render();
    });
    current.on('stopped', ({ reason }) => {
      said = reason === 'timeout' ? 'Nobody came along. Press Find to try again.' : 'Stopped. Press Find to meet someone.';
      render();
    });
    current.on('reconnecting', () => render());
    current.on('reconnected', () => render());
    current.on('disconnected', () => {
      said = 'Lost the connection to the server. Press Find to try again.';
      render();
    });
    current.on('error', (e) => hooks.showError(e));
  }
  said = '';
  try {
    await finder.find(location.origin, { name, token: linkToken('lobby') });
  } catch (err) {
    hooks.showError(/** @type {any} */ (err));
  }
  render();
}

function render() {
  const state = finder?.state ?? 'new';
  if (finder?.match) lastPartner = finder.match.name;
  toggle(statusText, 'data-waiting', state === 'waiting' || state === 'reconnecting');
  if (state === 'waiting') {
    const ahead = finder?.position ?? 0;
    statusText.textContent = ahead > 0 ? `Looking for someone… (${ahead} ahead of you)` : 'Looking for someone…';
  } else if (state === 'reconnecting') {
    statusText.textContent = 'Connection lost. Keeping your place…';
  } else if (state === 'matched') {
    statusText.textContent = `You are talking with ${finder?.match?.name}.`;
  } else {
    statusText.textContent = said;
  }
  findButton.disabled = state === 'waiting' || state === 'matched' || state === 'reconnecting';
  nextButton.disabled = state !== 'matched';
  stopButton.disabled = state !== 'waiting' && state !== 'matched';
}

/**
 * @param {HTMLElement} el
 * @param {string} name
 * @param {boolean} on
 */
function toggle(el, name, on) {
  if (on) el.setAttribute(name, '');
  else el.removeAttribute(name);
}

// Keyboard shortcuts for the judging page. Loaded from this origin only (the CSP forbids inline script).
// A / Left arrow = A better, B / Right arrow = B better, T = tie, X = both bad, 1-3 = strength.
(function () {
  "use strict";
  var form = document.getElementById("judge-form");
  if (!form) { return; }
  var buttons = {
    a: "choose-left", arrowleft: "choose-left",
    b: "choose-right", arrowright: "choose-right",
    t: "choose-tie", x: "choose-both-bad"
  };
  var submitted = false;
  form.addEventListener("submit", function (event) {
    // One submission per page: a double click or a held key must not send the judgment twice.
    if (submitted) { event.preventDefault(); }
    submitted = true;
  });
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio"))) { return; }
    var key = event.key.toLowerCase();
    if (key === "1" || key === "2" || key === "3") {
      var radio = form.querySelector('input[name="strength"][value="' + key + '"]');
      if (radio) { radio.checked = true; event.preventDefault(); }
      return;
    }
    var id = buttons[key];
    if (!id || submitted) { return; }
    event.preventDefault();
    form.requestSubmit(document.getElementById(id));
  });
  form.dataset.shortcuts = "on";  // lets tests (and styles) know the keys are live
})();

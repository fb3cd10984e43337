import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from appliance.admin.responses import error, results


class ResponsesTests(SynchronousTestCase):
    def test_results_shape(self) -> None:
        request = DummyRequest([b""])
        body = results(request, [{"a": 1}], links={"next": "x"})
        self.assertEqual(json.loads(body), {"results": [{"a": 1}], "links": {"next": "x"}})
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])

    def test_error_shape_and_status(self) -> None:
        request = DummyRequest([b""])
        body = error(request, 400, "from is required", param="from")
        self.assertEqual(json.loads(body), {"errors": [{"message": "from is required", "param": "from"}]})
        self.assertEqual(request.responseCode, 400)

    def test_non_finite_numbers_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            results(DummyRequest([b""]), float("inf"))
